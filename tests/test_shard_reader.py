"""The training reader's strict parsers (tar header scan, npy decoding) equal the standard library's on what
the builder writes, and fail naming the shard on anything else (tests/test_hostile_shards.py has the
hostile cases)."""

import io
import tarfile

import numpy as np
import pytest

from higgs_ds.shards.format import decode_codes, scan_tar
from higgs_ds.shards.writer import encode_codes
from higgs_ds.stream.plan import ShardRef
from higgs_ds.stream.reader import ShardError, member_table, read_positions, read_shard


def _write_tar(path, members: dict, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _sample(key: str, frames: int) -> dict:
    codes = np.arange(8 * frames, dtype=np.uint16).reshape(8, frames)
    return {f"{key}.json": b'{"id": "%s"}' % key.encode(), f"{key}.codes.npy": encode_codes(codes)}


def test_header_scan_equals_tarfile_on_built_shards(small_shards):
    for path in sorted(small_shards.glob("shard-*.tar")):
        with tarfile.open(path) as tar:  # the standard library, on shards the builder wrote
            expected = [(m.name, m.offset_data, m.size) for m in tar]
        assert scan_tar(str(path)) == expected
    member_table.cache_clear()
    ref = ShardRef(str(small_shards / "shard-000000.tar"), 3)
    direct = list(read_positions([ref], [(0, 2), (0, 0)]))
    sequential = [record for _, record in read_shard(ref.path)]
    assert [r["json"] for r in direct] == [sequential[2]["json"], sequential[0]["json"]]
    assert all(np.array_equal(a["codes"], b["codes"]) for a, b in zip(direct, [sequential[2], sequential[0]]))


def test_pax_and_long_names_are_refused_by_name(tmp_path):
    key = "k" * 120  # longer than ustar's 100-character name field: a pax header, which the builder never writes
    path = tmp_path / "pax.tar"
    _write_tar(path, _sample(key, 5) | _sample("short", 3), fmt=tarfile.PAX_FORMAT)
    with pytest.raises(ShardError, match=r"pax.tar: tar header at byte 0 is a pax extended header.*rebuild"):
        member_table(str(path))


def test_truncated_or_garbled_shards_name_the_file(tmp_path):
    path = tmp_path / "cut.tar"
    _write_tar(path, _sample("a", 400))
    data = path.read_bytes()
    for cut in (1500, 3000):  # inside the codes member's header (tarfile then stops quietly), inside its data
        path.write_bytes(data[:cut])
        with pytest.raises(ShardError, match="cut.tar"):
            member_table.cache_clear()
            member_table(str(path))
    garbled = tmp_path / "garbled.tar"
    garbled.write_bytes(b"not a tar archive at all" * 100)
    with pytest.raises(ShardError, match="garbled.tar"):
        list(read_positions([ShardRef(str(garbled), 1)], [(0, 0)]))


def test_codes_decode_like_numpy_and_refuse_anything_else(tmp_path):
    codes = np.random.RandomState(0).randint(0, 1024, size=(8, 37)).astype(np.uint16)
    fast = decode_codes(encode_codes(codes), "m")
    assert fast.dtype == np.uint16 and np.array_equal(fast, codes)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(codes))  # another header than the builder's: refused, never np.load
    with pytest.raises(ShardError, match="not the one of a C-order 2-D '<u2'"):
        decode_codes(buf.getvalue(), "m")
    with pytest.raises(ShardError, match="declares shape"):
        decode_codes(encode_codes(codes)[:-10], "m")
    buf = io.BytesIO()
    np.savez(buf, codes=codes)  # an archive under the .npy name: refused, not opened
    with pytest.raises(ShardError, match="not a .npy array"):
        decode_codes(buf.getvalue(), "m")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ShardError, match="never an object array or pickle"):
        decode_codes(buf.getvalue(), "m")


def _tts_sample(i: int, tok) -> tuple[dict, np.ndarray]:
    from higgs_ds.stream.tokens import chatml_tokens, expanded_length

    frames = 20 + 7 * i
    chatml = {
        "messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": f"sample number {i} reads a short line"},
            {"role": "assistant", "content": {"type": "audio", "audio_url": f"a/{i}.flac"}},
        ],
        "speaker": "spk0",
    }
    input_ids, label_ids, _ = chatml_tokens(chatml, tok)
    meta = dict(chatml, id=f"s{i}", audio=[{"url": f"a/{i}.flac", "frames": frames, "seconds": frames / 25}])
    meta.update(target_frames=frames, expanded_length=expanded_length(len(input_ids), [frames]))
    meta.update(input_ids=input_ids, label_ids=label_ids)
    codes = np.random.RandomState(i).randint(0, 1024, size=(8, frames)).astype(np.uint16)
    return meta, codes


def test_token_ids_as_a_member_or_in_old_shards_json_give_equal_batches(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from higgs_ds.models.interface import make_collator
    from higgs_ds.shards.writer import ShardWriter
    from higgs_ds.stream import tokens
    from higgs_ds.stream.tokens import SampleEncoder

    tok, config = AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
    samples = [_tts_sample(i, tok) for i in range(5)]
    writer = ShardWriter(tmp_path / "new", max_samples=10)
    for i, (meta, codes) in enumerate(samples):
        writer.write(f"{i:09d}", meta, codes, 1.0)
    new = str(tmp_path / "new" / writer.close()[0]["file"])
    with tarfile.open(new) as tar:
        names = tar.getnames()
        assert "000000000.tokens.npy" in names and b"input_ids" not in tar.extractfile("000000000.json").read()
    old = tmp_path / "old.tar"  # what earlier builders wrote: the ids in each sample's JSON, no tokens member
    _write_tar(old, {k: v for i, (m, c) in enumerate(samples) for k, v in _old_sample(f"{i:09d}", m, c).items()})
    assert not any(n.endswith("tokens.npy") for n in tarfile.open(old).getnames())

    encode, collate = SampleEncoder(tok, stored_tokens=True), make_collator(config, tok, "fast")
    monkeypatch.setattr(tokens, "chatml_tokens", lambda *a: pytest.fail("tokenized: the stored ids were not used"))
    positions = [(0, i) for i in (3, 0, 4, 1, 2)]
    batches, encoded = [], []
    for path in (new, str(old)):
        member_table.cache_clear()
        records = list(read_positions([ShardRef(path, 5)], positions, vocab_size=len(tok)))
        encoded.append([encode(r) for r in records])
        batches.append(collate(encoded[-1]))
    assert [e.input_ids.tolist() for e in encoded[0]] == [samples[i][0]["input_ids"] for _, i in positions]
    assert [e.label_ids.tolist() for e in encoded[0]] == [samples[i][0]["label_ids"] for _, i in positions]
    assert batches[0].keys() == batches[1].keys()
    for key in batches[0]:
        a, b = batches[0][key], batches[1][key]
        assert (a == b).all() if hasattr(a, "shape") else a == b, key


def _old_sample(key: str, meta: dict, codes: np.ndarray) -> dict:
    import json

    return {f"{key}.codes.npy": encode_codes(codes), f"{key}.json": json.dumps(meta, sort_keys=True).encode()}
