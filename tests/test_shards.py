"""Stages: shard writer/builder (tar + index + rejects) and the shard reader's safety checks."""

import io
import json
import tarfile

import numpy as np
import pytest

from higgs_ds.shard_build import BuildConfig, build_shards
from higgs_ds.shard_reader import ShardError, load_index, read_shard

from .conftest import SMALL_IDS, demo_lines, write_manifest


def test_index_describes_the_shards(small_shards):
    index = load_index(small_shards)
    assert index["schema_version"] == 1
    assert index["num_samples"] == len(SMALL_IDS) == sum(s["num_samples"] for s in index["shards"])
    assert [s["num_samples"] for s in index["shards"]] == [3, 3, 2]
    codec = index["codec"]
    assert (codec["num_codebooks"], codec["codebook_size"], codec["frame_rate"], codec["sample_rate"]) == (
        8,
        1024,
        25,
        24000,
    )
    for shard in index["shards"]:
        path = small_shards / shard["file"]
        assert path.stat().st_size == shard["bytes"]
        from higgs_ds.codec import sha256_file

        assert sha256_file(path) == shard["sha256"]
    assert (small_shards / "rejects.jsonl").read_text() == ""


def test_shard_members_are_json_and_uint16_codes(small_shards):
    names = tarfile.open(small_shards / "shard-000000.tar").getnames()
    assert names == [f"00000000{i}.{ext}" for i in range(3) for ext in ("codes.npy", "json")]
    for _, record in read_shard(str(small_shards / "shard-000000.tar")):
        meta, codes = record["json"], record["codes"]
        assert codes.dtype == np.uint16 and codes.shape[0] == 8
        assert codes.shape[1] == sum(a["frames"] for a in meta["audio"])
        for item in meta["audio"]:  # T = ceil(24 kHz samples / 960), or one less (codec trims its branches)
            assert item["frames"] in (
                int(np.ceil(item["seconds"] * 25)) - 1,
                int(np.ceil(item["seconds"] * 25)),
                int(np.ceil(item["seconds"] * 25)) + 1,
            )
        assert meta["source"]["line"] >= 1 and meta["id"] in SMALL_IDS


def test_shards_read_with_the_webdataset_library(small_shards):
    import webdataset as wds

    urls = [str(p) for p in sorted(small_shards.glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == len(SMALL_IDS)
    assert {s["json"]["id"] for s in samples} == SMALL_IDS
    assert all(s["codes.npy"].dtype == np.uint16 for s in samples)


def test_build_is_byte_identical_and_accounts_for_every_line(tmp_path, tiny_codec):
    lines = demo_lines({"alice_001", "bob_002"}) + ["{broken", json.dumps({"messages": []})]
    lines.append({"messages": [{"role": "assistant", "content": {"type": "audio", "audio_url": "audio/nope.wav"}}]})
    manifest = write_manifest(tmp_path / "in", lines)
    summaries = [
        build_shards([str(manifest)], str(tmp_path / out), tiny_codec, BuildConfig(), progress=False)
        for out in ("a", "b")
    ]
    assert summaries[0]["accepted"] == 2 and summaries[0]["rejected"] == 3 and summaries[0]["inputs"] == 5
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    rejects = [json.loads(line) for line in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [3, 4, 5]
    assert "audio file not found" in rejects[2]["reason"] and rejects[2]["manifest"] == str(manifest)


def test_over_long_audio_is_rejected_not_truncated(tmp_path, tiny_codec):
    manifest = write_manifest(tmp_path / "in", demo_lines({"alice_001", "bob_002"}))
    summary = build_shards(
        [str(manifest)], str(tmp_path / "out"), tiny_codec, BuildConfig(max_seconds=2.33), progress=False
    )
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert summary["accepted"] == 1 and summary["rejected"] == 1
    assert all("over --max-seconds 2.33" in r["reason"] for r in rejects)


def _tar_with(path, members: dict):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_reader_refuses_unknown_members_and_pickled_arrays(tmp_path):
    _tar_with(tmp_path / "evil.tar", {"000000000.json": b"{}", "000000000.pyd": b"\x80\x04K\x01."})
    with pytest.raises(ShardError, match=r"evil.tar: unexpected member '000000000.pyd'"):
        list(read_shard(str(tmp_path / "evil.tar")))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _tar_with(tmp_path / "pickled.tar", {"000000000.json": b"{}", "000000000.codes.npy": buf.getvalue()})
    with pytest.raises(ShardError, match="pickled.tar"):
        list(read_shard(str(tmp_path / "pickled.tar")))
    (tmp_path / "cut.tar").write_bytes((tmp_path / "evil.tar").read_bytes()[:700])
    with pytest.raises(ShardError, match="cut.tar"):
        list(read_shard(str(tmp_path / "cut.tar")))
