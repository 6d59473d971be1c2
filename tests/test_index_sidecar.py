"""index.samples.npy: the per-sample sidecar of index.json (lengths, speaker ids, clone_parts).

Values are checked against the samples' own JSON in the shards `shards build` wrote, an old index (per-shard
lists in index.json) reads to the same ShardRefs, and a hostile or damaged sidecar is one ShardError naming it.
"""

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from higgs_ds.shards.build import BuildConfig, build_shards
from higgs_ds.shards.verify import verify_shards
from higgs_ds.stream.reader import ShardError, load_index, read_shard, sample_table, shard_refs
from higgs_ds.stream.tokens import plain_tts, speaker_of

from .conftest import demo_lines, write_manifest

SIDECAR = "index.samples.npy"
ROW = [("shard", "<i4"), ("length", "<i4"), ("speaker", "<i4"), ("clone_parts", "<i4", (2,))]  # the documented row


def samples_of(shard_dir: Path) -> list[list[dict]]:
    """Per shard, each sample's JSON as the shard holds it."""
    index = load_index(shard_dir)
    return [[r["json"] for _, r in read_shard(str(shard_dir / s["file"]))] for s in index["shards"]]


def copy_of(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "set"
    shutil.copytree(shards, out)
    return out


def refs_as_lists(refs) -> list[tuple]:
    """Each ShardRef's fields as plain lists (numpy arrays have no ==), with their dtypes and shapes."""
    out = []
    for r in refs:
        fields = []
        for name in ("lengths", "speakers", "clone_parts"):
            value = getattr(r, name)
            fields.append(None if value is None else (str(value.dtype), value.shape, value.tolist()))
        out.append((r.path, r.num_samples, r.dataset, *fields))
    return out


@pytest.fixture(scope="module")
def untokenized_shards(tmp_path_factory, tiny_codec):
    """Speakers without --tokenizer: no lengths, plain TTS samples' clone_parts unknown."""
    ids = {"alice_001", "bob_002", "carol_003", "clone_alice_003"}
    manifest = write_manifest(tmp_path_factory.mktemp("untok"), demo_lines(ids))
    out = tmp_path_factory.mktemp("untok-shards")
    build_shards([str(manifest)], str(out), tiny_codec, BuildConfig(shard_samples=2), progress=False)
    return out


# ---------------------------------------------------------------- what is written


@pytest.mark.timeout(600)  # the shard fixture may be built here
def test_index_json_names_the_sidecar_and_holds_no_per_sample_lists(small_shards):
    index = json.loads((small_shards / "index.json").read_text())
    assert index["schema_version"] == 2
    desc = index["sample_table"]
    data = (small_shards / SIDECAR).read_bytes()
    assert desc["file"] == SIDECAR and desc["bytes"] == len(data) and desc["rows"] == index["num_samples"] == 8
    assert desc["sha256"] == hashlib.sha256(data).hexdigest()
    for shard in index["shards"]:
        assert not {"lengths", "speakers", "clone_parts"} & set(shard)
        assert {"target_frames", "expanded_lengths", "sha256", "bytes"} <= set(shard)  # summaries stay
    rows = np.load(small_shards / SIDECAR, allow_pickle=False)
    assert rows.dtype == np.dtype(ROW) and rows.shape == (8,)
    assert rows["shard"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # 3 + 3 + 2 samples, in shard order


@pytest.mark.timeout(600)
def test_round_trip_matches_every_samples_own_json(small_shards):
    refs = shard_refs([str(small_shards)])
    table = sample_table(small_shards)
    by_speaker: dict[str, int] = {}
    plain = 0
    for ref, metas in zip(refs, samples_of(small_shards), strict=True):
        assert ref.num_samples == len(metas)
        for field in (ref.lengths, ref.speakers):
            assert field.dtype == np.int32 and field.shape == (len(metas),)
        assert ref.clone_parts.dtype == np.int32 and ref.clone_parts.shape == (len(metas), 2)
        for i, meta in enumerate(metas):
            assert ref.lengths[i] == meta["expanded_length"] > 0
            speaker = speaker_of(meta)
            sid = int(ref.speakers[i])
            assert (sid == -1) == (speaker is None)
            if speaker is not None:
                assert table.speaker_names[sid] == speaker
                assert by_speaker.setdefault(speaker, sid) == sid  # one id per speaker string
            if plain_tts(meta):
                plain += 1
                assert ref.clone_parts[i].tolist() == meta["clone_parts"] and None not in meta["clone_parts"]
            else:
                assert ref.clone_parts[i].tolist() == [-1, -1]
    assert len(set(by_speaker.values())) == len(by_speaker) == 3 and plain == 6  # alice, bob, carol; 6 utterances


@pytest.mark.timeout(600)
def test_a_build_without_tokenizer_records_no_lengths_and_unknown_clone_parts(untokenized_shards):
    refs = shard_refs([str(untokenized_shards)])
    metas = samples_of(untokenized_shards)
    assert [r.lengths for r in refs] == [None, None]
    for ref, shard in zip(refs, metas, strict=True):
        for i, meta in enumerate(shard):
            assert "expanded_length" not in meta
            assert ref.clone_parts[i].tolist() == ([-2, -2] if plain_tts(meta) else [-1, -1])
    assert [m["id"] for shard in metas for m in shard if not plain_tts(m)] == ["clone_alice_003"]
    assert verify_shards(str(untokenized_shards), progress=False)["bad_shards"] == {}


# ---------------------------------------------------------------- old indexes


def rewrite_as_schema_1(shard_dir: Path, keep=("lengths", "speakers", "clone_parts")) -> None:
    """index.json as an older higgs-ds wrote it: per-shard lists (made from the samples themselves), no sidecar."""
    index = json.loads((shard_dir / "index.json").read_text())
    for shard, metas in zip(index["shards"], samples_of(shard_dir), strict=True):
        lists = {
            "lengths": [m["expanded_length"] for m in metas] if "expanded_length" in metas[0] else None,
            "speakers": [speaker_of(m) for m in metas],
            "clone_parts": [m.get("clone_parts", [None, None]) if plain_tts(m) else None for m in metas],
        }
        shard.update({k: v for k, v in lists.items() if k in keep and v is not None})
    for key in ("sample_table", "speaker_table"):
        del index[key]
    index["schema_version"] = 1
    (shard_dir / "index.json").write_text(json.dumps(index))
    (shard_dir / SIDECAR).unlink()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["small", "untokenized"])
def test_an_old_index_reads_to_the_same_shard_refs(which, small_shards, untokenized_shards, tmp_path):
    new = small_shards if which == "small" else untokenized_shards
    old = copy_of(new, tmp_path)
    rewrite_as_schema_1(old)
    expected = [(str(old / Path(r[0]).name), *r[1:]) for r in refs_as_lists(shard_refs([str(new)]))]
    assert refs_as_lists(shard_refs([str(old)])) == expected
    assert verify_shards(str(old), progress=False)["bad_shards"] == {}


@pytest.mark.timeout(600)
def test_an_index_from_before_speakers_were_recorded_has_none(small_shards, tmp_path):
    old = copy_of(small_shards, tmp_path)
    rewrite_as_schema_1(old, keep=("lengths",))
    refs = shard_refs([str(old)])
    assert all(r.speakers is None and r.clone_parts is None for r in refs)
    assert [len(r.lengths) for r in refs] == [3, 3, 2]


@pytest.mark.timeout(600)
def test_an_old_index_with_half_known_clone_parts_is_refused(small_shards, tmp_path):
    old = copy_of(small_shards, tmp_path)
    rewrite_as_schema_1(old)
    index = json.loads((old / "index.json").read_text())
    index["shards"][0]["clone_parts"][0] = [5, None]
    (old / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"index.json: shards\[0\] \(shard-000000.tar\): clone_parts\[0\] is"):
        shard_refs([str(old)])


# ---------------------------------------------------------------- hostile or damaged sidecars


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def plant(shard_dir: Path, data: bytes) -> None:
    """Replace the sidecar and make index.json vouch for it (size and sha256): only its contents can tell."""
    (shard_dir / SIDECAR).write_bytes(data)
    index = json.loads((shard_dir / "index.json").read_text())
    index["sample_table"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (shard_dir / "index.json").write_text(json.dumps(index))


def rows_with(shard_dir: Path, change) -> bytes:
    rows = np.load(shard_dir / SIDECAR, allow_pickle=False).copy()
    return npy_bytes(change(rows))


def _set(field, index, value):
    def change(rows):
        rows[field][index] = value
        return rows

    return change


class Pickled:
    """Unpickling this would run code: the reader must never do it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/higgs-ds-sidecar-unpickled",))


HOSTILE = {
    "object dtype (a pickle)": (lambda d: npy_bytes(np.array([Pickled()] * 8, object), True), "is not a .npy array"),
    "plain int64 array": (lambda d: npy_bytes(np.zeros(8, np.int64)), "holds dtype int64"),
    "fields renamed": (
        lambda d: npy_bytes(np.zeros(8, [("shard", "<i4"), ("len", "<i4"), ("speaker", "<i4"), ("c", "<i4", (2,))])),
        "holds dtype",
    ),
    "big-endian": (lambda d: npy_bytes(np.zeros(8, np.dtype(ROW).newbyteorder(">"))), "holds dtype"),
    "a row short": (lambda d: rows_with(d, lambda r: r[:7]), "holds shape (7,), index.json lists 8 samples"),
    "two-dimensional": (lambda d: rows_with(d, lambda r: r.reshape(2, 4)), "holds shape (2, 4)"),
    "shard out of order": (lambda d: rows_with(d, _set("shard", 3, 0)), "row 3 says shard 0, by index.json's counts"),
    "negative length": (lambda d: rows_with(d, _set("length", 2, -7)), "row 2 has length -7"),
    "length partly unknown": (lambda d: rows_with(d, _set("length", 4, -1)), "shard 1 has lengths for some samples"),
    "speaker past the table": (lambda d: rows_with(d, _set("speaker", 1, 3)), "row 1 has speaker id 3, outside"),
    "speaker below -1": (lambda d: rows_with(d, _set("speaker", 0, -2)), "row 0 has speaker id -2"),
    "half a clone part": (lambda d: rows_with(d, _set("clone_parts", 5, [-1, 40])), "row 5 has clone_parts [-1, 40]"),
    "not npy at all": (lambda d: b"PK\x03\x04" + bytes(200), "is not a .npy array"),
    "header only": (lambda d: (d / SIDECAR).read_bytes()[:128], "is not a .npy array"),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_sidecar_is_one_error_naming_it(case, small_shards, tmp_path):
    make, reason = HOSTILE[case]
    shard_dir = copy_of(small_shards, tmp_path)
    plant(shard_dir, make(shard_dir))
    for read in (lambda: shard_refs([str(shard_dir)]), lambda: verify_shards(str(shard_dir), progress=False)):
        with pytest.raises(ShardError) as err:
            read()
        message = str(err.value)
        assert message.startswith(str(shard_dir / SIDECAR)) and reason in message, message
        assert "higgs-ds shards build" in message and "higgs-ds shards verify" in message and "\n" not in message
    assert not os.path.exists("/tmp/higgs-ds-sidecar-unpickled")


DAMAGE = {
    "missing": (lambda p: p.unlink(), "is missing"),
    "cut short": (lambda p: p.write_bytes(p.read_bytes()[:-20]), "bytes, index.json says"),
    "one byte changed": (
        lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x07"),
        "differs from its sha256 in index.json",
    ),
    "a fifo": (lambda p: (p.unlink(), os.mkfifo(p)), "is not a regular file"),
    "a link out of the directory": (lambda p: (p.unlink(), p.symlink_to("/dev/zero")), "is a symbolic link to"),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_sidecar_is_one_error_naming_it(case, small_shards, tmp_path):
    damage, reason = DAMAGE[case]
    shard_dir = copy_of(small_shards, tmp_path)
    size = (shard_dir / SIDECAR).stat().st_size
    damage(shard_dir / SIDECAR)
    if case == "cut short":
        reason = f"has {size - 20} bytes, index.json says {size}"
    reads = [lambda: shard_refs([str(shard_dir)])]
    if case != "one byte changed":  # load_index checks what costs no read (training's startup check)
        reads.append(lambda: load_index(shard_dir))
    for read in reads:
        with pytest.raises(ShardError) as err:
            read()
        message = str(err.value)
        assert message.startswith(str(shard_dir / SIDECAR)) and reason in message, message
        assert "higgs-ds shards verify" in message and "\n" not in message


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda i: i["sample_table"].update(file="../elsewhere.npy"), "sample_table.file '../elsewhere.npy' is not"),
        (lambda i: i["sample_table"].update(rows=7), "sample_table.rows is 7"),
        (lambda i: i["sample_table"].update(sha256="x"), "sample_table.sha256 is 'x'"),
        (lambda i: i.pop("sample_table"), "'sample_table' (the per-sample sidecar) is missing"),
        (lambda i: i["speaker_table"].append(i["speaker_table"][0]), "'speaker_table' lists a speaker twice"),
        (lambda i: i["shards"][0].update(lengths=[1, 2, 3]), "lists 'lengths': a schema-2 index keeps them"),
    ],
)
def test_an_index_lying_about_its_sidecar_is_one_named_error(change, reason, small_shards, tmp_path):
    shard_dir = copy_of(small_shards, tmp_path)
    index = json.loads((shard_dir / "index.json").read_text())
    change(index)
    (shard_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError) as err:
        shard_refs([str(shard_dir)])
    assert str(err.value).startswith(str(shard_dir / "index.json")) and reason in str(err.value), err.value


@pytest.mark.timeout(600)
def test_verify_names_the_shard_whose_sidecar_values_lie_within_range(small_shards, tmp_path):
    shard_dir = copy_of(small_shards, tmp_path)
    plant(shard_dir, rows_with(shard_dir, _set("length", 4, 8)))  # a valid length, not sample 4's
    bad = verify_shards(str(shard_dir), progress=False)["bad_shards"]
    assert list(bad) == [str(shard_dir / "shard-000001.tar")] and "the index says length 8" in bad[list(bad)[0]]
    shard_dir2 = copy_of(small_shards, tmp_path / "2")
    speakers = np.load(shard_dir2 / SIDECAR)["speaker"]
    other = next(int(s) for s in speakers if s >= 0 and s != speakers[0])
    plant(shard_dir2, rows_with(shard_dir2, _set("speaker", 0, other)))
    bad = verify_shards(str(shard_dir2), progress=False)["bad_shards"]
    assert list(bad) == [str(shard_dir2 / "shard-000000.tar")] and "the index says speaker" in bad[list(bad)[0]]


@pytest.mark.timeout(600)
def test_the_sidecar_is_read_once_per_process_and_again_when_it_changes(small_shards, tmp_path):
    shard_dir = copy_of(small_shards, tmp_path)
    first = sample_table(shard_dir)
    assert sample_table(shard_dir) is first  # cached by path, inode, size, mtime and the index's hash
    assert not first.rows.flags.writeable  # a read-only map of the file
    plant(shard_dir, rows_with(shard_dir, _set("speaker", 0, 99)))  # a new file: checked again
    with pytest.raises(ShardError, match="row 0 has speaker id 99"):
        sample_table(shard_dir)


# ---------------------------------------------------------------- many samples


def synthetic_set(directory: Path, shards: int, per_shard: int, speakers: int) -> np.ndarray:
    """An index.json + sidecar of shards x per_shard samples (no shard files: only the index is read)."""
    directory.mkdir(parents=True)
    n = shards * per_shard
    rows = np.zeros(n, np.dtype(ROW))
    rows["shard"] = np.repeat(np.arange(shards), per_shard)
    rows["length"] = 64 + np.arange(n) % 4000
    rows["speaker"] = np.arange(n) % (speakers + 1) - 1
    rows["clone_parts"][:, 0] = 40
    rows["clone_parts"][:, 1] = rows["length"] - 40
    rows["clone_parts"][::7] = -1
    data = npy_bytes(rows)
    (directory / SIDECAR).write_bytes(data)
    entries = [
        {"file": f"shard-{k:06d}.tar", "num_samples": per_shard, "bytes": per_shard * 4096, "sha256": "0" * 64}
        for k in range(shards)
    ]
    index = {
        "schema_version": 2,
        "codec": {"num_codebooks": 8, "codebook_size": 1024, "sample_rate": 24000, "hop_length": 960, "frame_rate": 25},
        "num_samples": n,
        "shards": entries,
        "build": {},
        "speaker_table": [f"spk{i}" for i in range(speakers)],
        "sample_table": {"file": SIDECAR, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": n},
    }
    (directory / "index.json").write_text(json.dumps(index))
    return rows


@pytest.mark.timeout(300)
def test_a_million_sample_sidecar_reads_back_exactly(tmp_path):
    rows = synthetic_set(tmp_path / "big", shards=1000, per_shard=1000, speakers=5000)
    table = sample_table(tmp_path / "big")
    assert np.array_equal(table.rows, rows) and table.rows.dtype == rows.dtype
    assert len(table.speaker_names) == 5000 and table.recorded.all()
    lengths, speakers, parts = table.shard_fields(999)
    assert np.array_equal(lengths, rows["length"][999000:]) and np.array_equal(speakers, rows["speaker"][999000:])
    assert np.array_equal(parts, rows["clone_parts"][999000:]) and parts.shape == (1000, 2)
