"""A shard's sha256 is checked once per machine and file version (higgs_ds.shards.verified): a later open
reads only its headers, any change to the file (ctime) hashes it again, a record that is not exactly ours
is ignored, "always" hashes at every open, and an unwritable cache still reads."""

import logging
import os
import time
import types

import numpy as np
import orjson
import pytest

from higgs_ds.errors import UserError
from higgs_ds.shards import format as shard_format
from higgs_ds.shards import verified
from higgs_ds.shards.writer import ShardWriter, write_index
from higgs_ds.stream.loader import DataConfig
from higgs_ds.stream.reader import ShardError, member_table, read_shard, shard_promise

CODEC = {"num_codebooks": 8, "codebook_size": 1024, "frame_rate": 25, "sample_rate": 24000, "hop_length": 960}


def _record(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": f"sample {i}"},
            {"role": "assistant", "content": {"type": "audio", "audio_url": f"a/{i}.flac"}},
        ],
        "speaker": "spk0",
        "id": f"s{i}",
        "audio": [{"url": f"a/{i}.flac", "frames": 30, "seconds": 1.2}],
        "target_frames": 30,
    }


@pytest.fixture
def shard(tmp_path, monkeypatch):
    """A one-shard set of 4 samples, a private cache in tmp_path, records written at once (no settle time)."""
    monkeypatch.setenv("HIGGS_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "SETTLE_NS", 0)
    monkeypatch.setitem(verified._state, "warned", False)
    verified.set_mode("once")
    writer = ShardWriter(tmp_path / "set", max_samples=10)
    rng = np.random.RandomState(0)
    for i in range(4):
        writer.write(f"{i:09d}", _record(i), rng.randint(0, 1024, size=(8, 30)).astype(np.uint16), 1.2)
    write_index(tmp_path / "set" / "index.json", writer.close(), CODEC, {})
    member_table.cache_clear()
    yield str(tmp_path / "set" / "shard-000000.tar")
    member_table.cache_clear()
    verified.set_mode("once")


@pytest.fixture
def hashes(monkeypatch):
    """How many sha256 hashers the shard parser has made (one per file it hashes)."""
    made = []

    def sha256():
        made.append(1)
        return __import__("hashlib").sha256()

    monkeypatch.setattr(shard_format, "hashlib", types.SimpleNamespace(sha256=sha256))
    return made


def _fresh_table(path: str):
    member_table.cache_clear()  # as a new dataloader worker: nothing cached in the process
    return member_table(path)


def _key(path: str) -> dict:
    spec, _ = shard_promise(path)
    return verified.shard_key(path, os.stat(path), spec.sha256, spec.size)


def _codes_data_offset(path: str) -> int:
    return next(offset for name, offset, _ in shard_format.scan_tar(path) if name.endswith(".codes.npy"))


def test_second_open_reads_only_the_headers(shard, hashes):
    first = _fresh_table(shard)
    assert len(hashes) == 1 and len(os.listdir(verified.cache_dir())) == 1
    assert oct(os.stat(verified.cache_dir()).st_mode & 0o777) == "0o700"
    assert _fresh_table(shard) == first
    assert len(hashes) == 1  # no second hash
    # proof that no member data is read: corrupt a code byte, then vouch for the new file version by hand
    with open(shard, "r+b") as f:
        f.seek(_codes_data_offset(shard) + 200)
        f.write(b"\xff")
    verified.record_verified(_key(shard))
    assert _fresh_table(shard) == first and len(hashes) == 1


def test_changed_data_with_restored_mtime_is_hashed_again_and_refused(shard, hashes):
    _fresh_table(shard)
    before = os.stat(shard)
    time.sleep(0.05)  # past the file clock's coarse tick: the write gets a new ctime
    with open(shard, "r+b") as f:
        f.seek(_codes_data_offset(shard) + 200)
        f.write(b"\xff")
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    assert os.stat(shard).st_ctime_ns != before.st_ctime_ns
    with pytest.raises(ShardError, match="sha256 differs"):
        _fresh_table(shard)
    assert len(hashes) == 2


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        b"[1, 2]",
        b'{"version": 1}',
        "wrong types",
        "a float for an integer",
        "another key",
        "a second version",
        b" " * (verified.MAX_RECORD_BYTES + 1),
    ],
)
def test_a_record_that_is_not_ours_is_ignored(shard, hashes, content):
    table = _fresh_table(shard)
    key = _key(shard)
    record = {"version": 1, "key": dict(key)}
    if content == "wrong types":
        record["key"].update(st_ino=str(key["st_ino"]), sha256=[key["sha256"]])
    elif content == "a float for an integer":
        record["key"]["st_size"] = float(key["st_size"])
    elif content == "another key":
        record["key"]["path"] = "/elsewhere/shard-000000.tar"
    elif content == "a second version":
        record["version"] = 2
    raw = content if isinstance(content, bytes) else orjson.dumps(record)
    (verified.cache_dir() / os.listdir(verified.cache_dir())[0]).write_bytes(raw)
    assert not verified.is_verified(key)
    assert _fresh_table(shard) == table and len(hashes) == 2  # hashed again, then recorded again
    assert verified.is_verified(key)


def test_a_cache_others_can_write_to_is_not_trusted(shard, hashes):
    _fresh_table(shard)
    os.chmod(verified.cache_dir(), 0o777)
    _fresh_table(shard)
    assert len(hashes) == 2


def test_always_hashes_at_every_open_and_verify_always_hashes(shard, hashes):
    _fresh_table(shard)
    verified.set_mode("always")
    _fresh_table(shard)
    _fresh_table(shard)
    assert len(hashes) == 3
    verified.set_mode("once")
    assert len(list(read_shard(shard))) == 4  # `shards verify`, stats, evaluation: hashed, record or not
    assert len(hashes) == 4


def test_an_unwritable_cache_still_reads_and_logs_once(shard, hashes, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would be")  # unwritable even for root
    monkeypatch.setenv("HIGGS_DS_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger=verified.__name__):
        tables = [_fresh_table(shard) for _ in range(3)]
    assert tables[0] == tables[2] and len(tables[0]) == 4
    assert len(hashes) == 3
    assert len([r for r in caplog.records if "cannot record verified shards" in r.message]) == 1


def test_a_freshly_written_file_is_not_recorded(shard, hashes, monkeypatch):
    monkeypatch.setattr(verified, "SETTLE_NS", 3600 * 10**9)  # written "just now": its times may not tick yet
    _fresh_table(shard)
    _fresh_table(shard)
    assert len(hashes) == 2 and not verified.cache_dir().exists()


def test_verify_shards_is_checked():
    assert DataConfig(shards=["x"]).verify_shards == "once"
    DataConfig(shards=["x"], verify_shards="always")
    with pytest.raises(UserError, match=r"verify_shards = 'sometimes'.*'once'.*'always'"):
        DataConfig(shards=["x"], verify_shards="sometimes")
