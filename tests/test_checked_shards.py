"""A shard checked whole once per machine and file version (higgs_ds.shards.checked) is read without
decoding (higgs_ds.stream.checked_read): its samples equal the strict path's, a later open walks no tar
header and decodes no JSON, a file written to after the check, a tampered record or table, a held lock,
a bad sample or JSON-stored ids all leave the shard on the strict path, which names what is wrong."""

import os
import shutil

import numpy as np
import orjson
import pytest

from higgs_ds.shards import checked, verified
from higgs_ds.shards import format as shard_format
from higgs_ds.shards.writer import ShardWriter, write_index
from higgs_ds.stream import checked_read
from higgs_ds.stream import reader as reader_module
from higgs_ds.stream.collate import batches_equal
from higgs_ds.stream.plan import ShardRef
from higgs_ds.stream.reader import ShardError, member_table, read_positions, shard_refs
from higgs_ds.stream.tokens import SampleEncoder

CODEC = {"num_codebooks": 8, "codebook_size": 1024, "frame_rate": 25, "sample_rate": 24000, "hop_length": 960}
VOCAB = 500


def _record(i: int, items: int) -> dict:
    frames = [7 + 3 * i + j for j in range(items)]
    user = [{"type": "audio", "audio_url": f"a/{i}-{j}.flac"} for j in range(items - 1)]
    n = 5 + i
    return {
        "messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": user + [{"type": "text", "text": f"sample {i}"}] if user else f"sample {i}"},
            {"role": "assistant", "content": {"type": "audio", "audio_url": f"a/{i}.flac"}},
        ],
        "speaker": "spk0",
        "id": f"s{i}",
        "audio": [{"url": f"a/{i}-{j}.flac", "frames": t, "seconds": t / 25} for j, t in enumerate(frames)],
        "target_frames": frames[-1],
        "input_ids": [(3 * i + 7 * k) % VOCAB for k in range(n)],
        "label_ids": [-100 if k < 2 else (5 * k + i) % VOCAB for k in range(n)],
    }


def _write_set(folder, samples: int = 9, per_shard: int = 4, stored_ids: bool = True, bad: int | None = None):
    writer = ShardWriter(folder, max_samples=per_shard)
    rng = np.random.RandomState(0)
    for i in range(samples):
        record = _record(i, 1 + i % 3)
        if not stored_ids:
            record.pop("input_ids"), record.pop("label_ids")
        frames = sum(a["frames"] for a in record["audio"])
        codes = rng.randint(0, 1024, size=(8, frames)).astype(np.uint16)
        if i == bad:
            codes[3, 2] = 1024  # outside the codebook
        writer.write(f"{i:09d}", record, codes, frames / 25)
    write_index(folder / "index.json", writer.close(), CODEC, {})
    return [ShardRef(r.path, r.num_samples, r.lengths) for r in shard_refs([str(folder)])]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A private cache in tmp_path, records written at once (no settle time), nothing open in the process."""
    monkeypatch.setenv("HIGGS_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "SETTLE_NS", 0)
    verified.set_mode("once")

    def reset():
        member_table.cache_clear()
        checked_read.clear()

    reset()
    yield reset
    reset()
    verified.set_mode("once")


def _strict(refs, positions):
    encode = SampleEncoder(None, stored_tokens=True)
    return [encode(r) for r in read_positions(refs, positions, vocab_size=VOCAB)]


def _same(a, b) -> bool:
    return (
        a.sample_id == b.sample_id
        and a.frames == b.frames
        and a.input_ids.dtype == b.input_ids.dtype == np.int64
        and np.array_equal(a.input_ids, b.input_ids)
        and np.array_equal(a.label_ids, b.label_ids)
        and a.codes.dtype == b.codes.dtype
        and np.array_equal(a.codes, b.codes)
    )


ALL = [(s, i) for s in range(3) for i in range((4, 4, 1)[s])]
SHUFFLED = [ALL[k] for k in np.random.RandomState(1).permutation(len(ALL))]


@pytest.mark.both_envs
def test_checked_samples_equal_the_strict_path(tmp_path, fresh):
    refs = _write_set(tmp_path / "set")
    first = checked_read.read_encoded(refs, SHUFFLED, VOCAB)  # checks each shard whole, records it
    fresh()  # a new worker: the tables come from the records
    later = checked_read.read_encoded(refs, SHUFFLED, VOCAB)
    strict = _strict(refs, SHUFFLED)
    assert first is not None and later is not None
    assert [len(s.frames) for s in strict] != [1] * len(strict)  # multi-item samples are in the set
    assert all(_same(a, b) for a, b in zip(first, strict)) and all(_same(a, b) for a, b in zip(later, strict))
    assert len(list((tmp_path / "cache" / "verified-shards").glob("*.checked.json"))) == 3


def test_a_later_open_walks_no_header_and_decodes_no_json(tmp_path, fresh, monkeypatch):
    refs = _write_set(tmp_path / "set")
    assert checked_read.read_encoded(refs, ALL, VOCAB) is not None
    fresh()

    def refuse(*args, **kwargs):
        raise AssertionError("the strict path was taken")

    for module, name in [(reader_module, "scan_tar"), (checked_read, "member_table"), (checked_read, "decode_sample")]:
        monkeypatch.setattr(module, name, refuse)
    assert checked_read.read_encoded(refs, SHUFFLED, VOCAB) is not None


@pytest.mark.both_envs  # each family's collator on the checked and the strict samples
def test_the_stream_gives_the_same_batches_with_and_without_tables(tmp_path, fresh, tiny_model_dir, small_shards):
    from transformers import AutoConfig, AutoTokenizer

    from higgs_ds.stream.loader import DataConfig, build_dataloader

    tok, config = AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
    shards = tmp_path / "small"
    shutil.copytree(small_shards, shards)
    runs = {}
    for mode in ("always", "once", "once"):  # always: the strict path; once: checks and records, then tables
        fresh()
        cfg = DataConfig(shards=[str(shards)], batch_size=3, num_workers=0, verify_shards=mode)
        runs.setdefault(mode, []).append(list(build_dataloader(cfg, tok, config, rank=0, world_size=1)))
    assert checked_read._OPEN and all(entry is not None for entry in checked_read._OPEN.values())
    for run in [runs["once"][0], runs["once"][1]]:
        assert len(run) == len(runs["always"][0])
        for a, b in zip(run, runs["always"][0]):
            assert a["sample_ids"] == b["sample_ids"] and not batches_equal(
                {k: v for k, v in a.items() if k != "sample_ids"}, {k: v for k, v in b.items() if k != "sample_ids"}
            )


def test_a_file_written_after_its_check_is_read_the_strict_way(tmp_path, fresh):
    refs = _write_set(tmp_path / "set")
    assert checked_read.read_encoded(refs, ALL, VOCAB) is not None
    path = refs[0].path
    offset = next(o for name, o, _ in shard_format.scan_tar(path) if name.endswith(".codes.npy"))
    with open(path, "r+b") as f:  # the same size, one code out of range: only a check of the bytes finds it
        f.seek(offset + 128)
        f.write(np.array([2000], "<u2").tobytes())
    # in this process the table is open: the batch's fstat sees the write, the batch goes strict
    assert checked_read.read_encoded(refs, [(0, 0)], VOCAB) is None
    assert checked_read.read_encoded(refs, [(0, 1)], VOCAB) is None  # and the shard stays strict
    fresh()  # a new process: the file's ctime moved, its record does not match any more
    assert checked_read.read_encoded(refs, [(1, 0)], VOCAB) is not None
    assert checked_read.read_encoded(refs, [(0, 1)], VOCAB) is None
    with pytest.raises(ShardError, match="sha256 differs"):
        list(read_positions(refs, [(0, 0)], vocab_size=VOCAB))


@pytest.mark.parametrize("damage", ["table", "record", "record_key", "span_past_the_file"])
def test_a_tampered_record_is_not_used(tmp_path, fresh, damage):
    refs = _write_set(tmp_path / "set", samples=4)
    assert checked_read.read_encoded(refs, ALL[:4], VOCAB) is not None
    folder = tmp_path / "cache" / "verified-shards"
    (record,) = folder.glob("*.checked.json")
    table = record.with_name(record.name.replace(".checked.json", ".checked.table"))
    if damage == "table":
        data = bytearray(table.read_bytes())
        data[8] ^= 1  # the span length of sample 0
        table.write_bytes(bytes(data))
    elif damage == "span_past_the_file":  # a consistent record whose span would size a 1 TiB read
        rows = np.frombuffer(table.read_bytes(), "<i8").copy()
        rows[checked.SPAN_LEN] = 1 << 40
        table.write_bytes(rows.tobytes())
        value = orjson.loads(record.read_bytes())
        value["table_sha256"] = __import__("hashlib").sha256(rows.tobytes()).hexdigest()
        record.write_bytes(orjson.dumps(value))
    else:
        value = orjson.loads(record.read_bytes())
        if damage == "record":
            value["ids"][0] = "someone-else"
            value["table_sha256"] = "0" * 64
        else:
            value["key"]["limits"] = [8, 1024, None]
        record.write_bytes(orjson.dumps(value))
    fresh()
    assert checked.load(_key(refs[0].path), 4) is None
    assert checked_read.read_encoded(refs, ALL[:4], VOCAB) is not None  # checked again, recorded anew
    assert checked.load(_key(refs[0].path), 4) is not None


def _key(path: str) -> dict:
    spec, limits = reader_module.shard_promise(path)
    return checked.table_key(
        verified.shard_key(path, os.stat(path), spec.sha256, spec.size),
        limits.num_codebooks,
        limits.codebook_size,
        VOCAB,
    )


def test_a_held_lock_reads_the_strict_way_and_records_nothing(tmp_path, fresh):
    refs = _write_set(tmp_path / "set", samples=4)
    lock = checked.try_lock(_key(refs[0].path))  # another process is checking the shard
    assert lock is not None
    try:
        assert checked_read.read_encoded(refs, ALL[:4], VOCAB) is None
        assert checked.load(_key(refs[0].path), 4) is None
    finally:
        os.close(lock)
    fresh()
    assert checked_read.read_encoded(refs, ALL[:4], VOCAB) is not None


def test_a_bad_sample_keeps_its_shard_strict_and_is_named_when_read(tmp_path, fresh):
    refs = _write_set(tmp_path / "set", bad=2)
    assert checked_read.read_encoded(refs, [(0, 0)], VOCAB) is None  # shard 0 holds sample 2: no table
    assert checked_read.read_encoded(refs, [(1, 0), (2, 0)], VOCAB) is not None
    assert [s.sample_id for s in _strict(refs, [(0, 0), (0, 1), (0, 3)])] == ["s0", "s1", "s3"]
    with pytest.raises(ShardError, match=r"000000002\.codes\.npy.*1024 >= the codebook size"):
        _strict(refs, [(0, 2)])


def test_another_vocabulary_is_checked_again(tmp_path, fresh):
    refs = _write_set(tmp_path / "set", samples=4)
    assert checked_read.read_encoded(refs, ALL[:4], VOCAB) is not None
    assert checked_read.read_encoded(refs, ALL[:4], 20) is None  # ids up to 499 are outside a vocabulary of 20
    with pytest.raises(ShardError, match="outside the tokenizer's vocabulary"):
        list(read_positions(refs, ALL[:4], vocab_size=20))


def test_ids_stored_in_the_json_keep_the_strict_path(tmp_path, fresh, monkeypatch):
    refs = _write_set(tmp_path / "set", samples=4, stored_ids=False)
    assert checked_read.read_encoded(refs, ALL[:4], VOCAB) is None
    assert not list((tmp_path / "cache" / "verified-shards").glob("*.checked.json"))


def test_always_never_uses_or_writes_tables(tmp_path, fresh):
    refs = _write_set(tmp_path / "set", samples=4)
    verified.set_mode("always")
    assert checked_read.read_encoded(refs, ALL[:4], VOCAB) is None
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.checked.json"))
