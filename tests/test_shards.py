"""Stages: shard writer/builder (tar + index + rejects) and the shard reader's safety checks."""

import io
import json
import tarfile

import numpy as np
import pytest

from higgs_ds.shards.build import BuildConfig, build_shards
from higgs_ds.stream.reader import ShardError, load_index, read_shard

from .conftest import SMALL_IDS, demo_lines, write_manifest


def test_index_describes_the_shards(small_shards):
    index = load_index(small_shards)
    assert index["schema_version"] == 2  # per-sample values in index.samples.npy (test_index_sidecar)
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
        from higgs_ds.shards.codec import sha256_file

        assert sha256_file(path) == shard["sha256"]
    assert (small_shards / "rejects.jsonl").read_text() == ""


def test_shard_members_are_json_uint16_codes_and_int32_tokens(small_shards, tiny_model_dir):
    from transformers import AutoTokenizer

    from higgs_ds.stream.tokens import chatml_tokens

    names = tarfile.open(small_shards / "shard-000000.tar").getnames()  # built with --tokenizer
    assert names == [f"00000000{i}.{ext}" for i in range(3) for ext in ("codes.npy", "json", "tokens.npy")]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for _, record in read_shard(str(small_shards / "shard-000000.tar")):
        meta, codes, tokens = record["json"], record["codes"], record["tokens"]
        assert "input_ids" not in meta and "label_ids" not in meta  # the ids are binary, not JSON lists
        chatml = {k: meta[k] for k in ("messages", "speaker") if k in meta}
        input_ids, label_ids, _ = chatml_tokens(chatml, tok, meta["id"])
        assert tokens.dtype == np.int32 and tokens.tolist() == [input_ids, label_ids]
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


def _members(shard_dir):
    """key -> (json, codes bytes) over all shards of a directory, in shard order."""
    out = {}
    index = load_index(shard_dir)
    for shard in index["shards"]:
        with tarfile.open(shard_dir / shard["file"]) as tar:
            for m in tar:
                out.setdefault(m.name.split(".")[0], {})[m.name.split(".", 1)[1]] = tar.extractfile(m).read()
    return out


@pytest.mark.timeout(600)
def test_workers_slices_and_merge_give_the_single_process_result(
    tmp_path, small_manifest, small_shards, tiny_model_dir
):
    from higgs_ds.shards.build import merge_slices

    parallel = tmp_path / "parallel"
    build_shards(
        [str(small_manifest)],
        str(parallel),
        "tiny",
        BuildConfig(shard_samples=3, workers=2, tokenizer=str(tiny_model_dir)),
        progress=False,
    )
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (parallel / name).read_bytes() == (small_shards / name).read_bytes()

    sliced = tmp_path / "sliced"
    for i in range(3):
        build_shards(
            [str(small_manifest)],
            str(sliced),
            "tiny",
            BuildConfig(shard_samples=3, slice_index=i, num_slices=3, tokenizer=str(tiny_model_dir)),
            progress=False,
        )
    with pytest.raises(Exception, match="index.json"):
        load_index(sliced)  # not merged yet
    summary = merge_slices(str(sliced))
    assert summary["accepted"] == 8 and summary["slices"] == 3
    assert _members(sliced) == _members(small_shards)  # same keys, same samples, same codes, same order
    assert load_index(sliced)["num_samples"] == load_index(small_shards)["num_samples"]
    assert json.loads((sliced / "index.slice-0000-of-0003.json").read_text())["shards"][0]["speakers"]  # lists
    merged, whole = (np.load(d / "index.samples.npy", allow_pickle=False) for d in (sliced, small_shards))
    for field in ("length", "speaker", "clone_parts"):  # the same samples in the same order (shards differ)
        assert merged[field].tolist() == whole[field].tolist()
    assert load_index(sliced)["speaker_table"] == load_index(small_shards)["speaker_table"]


def test_merge_names_missing_slices(tmp_path, small_manifest):
    from higgs_ds.shards.build import BuildError, merge_slices

    build_shards([str(small_manifest)], str(tmp_path), "tiny", BuildConfig(slice_index=1, num_slices=3), progress=False)
    with pytest.raises(BuildError, match=r"missing \[0, 2\]"):
        merge_slices(str(tmp_path))


def test_resume_continues_after_the_last_complete_shard(tmp_path, tiny_codec):
    from higgs_ds.shards.build import BuildError

    lines = demo_lines({"alice_001", "alice_002", "bob_001", "bob_002", "carol_001", "carol_002"})
    lines.insert(4, "{bad json")
    manifest = write_manifest(tmp_path / "in", lines)
    cfg = BuildConfig(shard_samples=2)
    build_shards([str(manifest)], str(tmp_path / "whole"), tiny_codec, cfg, progress=False)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(BuildError, match="invalid JSON"):  # stops at line 5, after two complete shards
        build_shards(
            [str(manifest)], str(interrupted), tiny_codec, BuildConfig(shard_samples=2, fast_fail=True), progress=False
        )
    assert sorted(p.name for p in interrupted.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(BuildError, match="--resume"):
        build_shards([str(manifest)], str(interrupted), tiny_codec, cfg, progress=False)
    summary = build_shards(
        [str(manifest)], str(interrupted), tiny_codec, BuildConfig(shard_samples=2, resume=True), progress=False
    )
    assert summary["accepted"] == 6 and summary["rejected"] == 1
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "rejects.jsonl"):
        assert (interrupted / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert load_index(interrupted)["shards"] == load_index(tmp_path / "whole")["shards"]


def test_min_shards_and_verify_and_stats(tmp_path, small_manifest, small_shards, tiny_model_dir):
    from higgs_ds.shards.verify import shard_stats, verify_shards

    out = tmp_path / "four"
    build_shards(
        [str(small_manifest)],
        str(out),
        "tiny",
        BuildConfig(min_shards=4, tokenizer=str(tiny_model_dir)),
        progress=False,
    )
    index = load_index(out)
    assert len(index["shards"]) == 4
    assert all(s["expanded_lengths"]["min"] > s["target_frames"]["min"] for s in index["shards"])

    clean = verify_shards(str(out), progress=False)
    assert clean["bad_shards"] == {} and clean["samples_checked"] == 8
    data = bytearray((out / "shard-000002.tar").read_bytes())
    data[600] ^= 0xFF
    (out / "shard-000002.tar").write_bytes(bytes(data))
    (out / "shard-000003.tar").unlink()
    report = verify_shards(str(out), progress=False)
    assert set(report["bad_shards"]) == {str(out / "shard-000002.tar"), str(out / "shard-000003.tar")}
    assert "sha256" in report["bad_shards"][str(out / "shard-000002.tar")]

    stats = shard_stats(str(small_shards), plot=str(tmp_path / "hist.png"))
    assert stats["samples"] == 8 and stats["speakers"] == 3 and 0.003 < stats["audio_hours"] < 0.01
    assert (tmp_path / "hist.png").read_bytes()[:4] == b"\x89PNG"


def test_random_access_reader_refuses_unknown_members(tmp_path):
    from higgs_ds.stream.plan import ShardRef
    from higgs_ds.stream.reader import read_positions

    _tar_with(tmp_path / "evil2.tar", {"000000000.json": b"{}", "000000000.pickle": b"\x80\x04K\x01."})
    with pytest.raises(ShardError, match=r"evil2.tar: unexpected member '000000000.pickle'"):
        list(read_positions([ShardRef(str(tmp_path / "evil2.tar"), 1)], [(0, 0)]))
