"""`shards build --split`: the held-out part for evaluation, deterministic and exact (every input line is
accepted in one part, or rejected by both, named)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from higgs_ds.errors import UserError
from higgs_ds.shards.split import HELDOUT, TRAIN, parse_split

from .conftest import REPO, SMALL_IDS, demo_lines, write_manifest

pytestmark = pytest.mark.timeout(300)


def _ids(shard_dir) -> set[str]:
    from higgs_ds.stream.reader import load_index, read_shard

    index = load_index(shard_dir)
    return {r["json"]["id"] for s in index["shards"] for _, r in read_shard(str(shard_dir / s["file"]))}


def test_a_fraction_is_decided_by_the_sample_id_alone():
    split = parse_split("0.05")
    ids = [f"utt_{i:06d}" for i in range(20000)]
    held = {i for i in ids if split.part_of(i, None) == HELDOUT}
    assert 0.045 < len(held) / len(ids) < 0.055  # about the fraction asked for
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert {i for i in shuffled[:5000] if split.part_of(i, "x") == HELDOUT} == held & set(shuffled[:5000])
    assert parse_split("speakers=carol, dan").part_of("a", "dan") == HELDOUT
    assert parse_split("speakers=carol").part_of("a", None) == TRAIN
    for bad in ("0", "1", "1.5", "nan", "five", "speakers=", " speakers= , "):
        with pytest.raises(UserError, match="--split"):
            parse_split(bad)


def test_build_writes_both_parts_and_accounts_for_every_line(tmp_path, tiny_model_dir):
    lines = demo_lines(SMALL_IDS)
    lines.insert(3, '{"messages": "not a list"}')  # a bad line: rejected by both builds, named
    manifest = write_manifest(tmp_path / "m", lines)
    train, held = tmp_path / "train", tmp_path / "held"
    cmd = [sys.executable, "-m", "higgs_ds.cli", "shards", "build", str(manifest), "--out", str(train),
           "--codec", "tiny", "--tokenizer", str(tiny_model_dir),
           "--split", "speakers=carol", "--heldout-out", str(held)]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [json.loads((d / "index.json").read_text())["build"] for d in (train, held)]
    inputs = len(lines)
    for summary, part in zip(summaries, ("train", "heldout")):
        assert summary["inputs"] == inputs
        assert summary["accepted"] + summary["rejected"] + summary["split"]["other_part"] == inputs
        assert summary["rejected"] == 1 and summary["split"] == dict(summary["split"], part=part)
    assert _ids(held) == {i for i in SMALL_IDS if "carol" in i}  # the clone samples are alice's and bob's
    assert _ids(train) == {i for i in SMALL_IDS if "carol" not in i}
    rejects = [json.loads(x) for x in (held / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["line"] == 4

    again = subprocess.run([*cmd[:7], str(tmp_path / "x"), *cmd[8:-2]], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "--split and --heldout-out go together" in again.stderr


def test_a_split_that_leaves_a_part_empty_is_refused(tmp_path, tiny_model_dir):
    from higgs_ds.shards.build import BuildConfig, build_shards

    manifest = write_manifest(tmp_path / "m", demo_lines({"alice_001", "bob_002"}))
    cfg = BuildConfig(tokenizer=str(tiny_model_dir), split="speakers=nobody", split_part=HELDOUT)
    with pytest.raises(UserError, match="leaves no sample in the heldout part of the 2 input lines"):
        build_shards([str(manifest)], str(tmp_path / "h"), "tiny", cfg, progress=False)


def test_an_interrupted_split_build_resumes_with_its_counts_and_a_lying_journal_is_caught(tmp_path, tiny_codec):
    from higgs_ds.errors import CheckFailed
    from higgs_ds.shards.build import BuildConfig, BuildError, build_shards

    from .test_build_safety import SIX, _journal, _manifest

    manifest = _manifest(tmp_path / "in", SIX, bad_line=5)  # alice_1 alice_2 bob_1 bob_2 {bad carol_1 carol_2
    cfg = BuildConfig(shard_samples=1, split="speakers=ali")
    whole = build_shards([str(manifest)], str(tmp_path / "whole"), tiny_codec, cfg, progress=False)
    assert (whole["accepted"], whole["rejected"], whole["split"]["other_part"]) == (4, 1, 2)

    def interrupted(name):
        out = tmp_path / name
        with pytest.raises(BuildError, match="invalid JSON"):  # stopped at line 5, after alice's 2 held-out lines
            build_shards([str(manifest)], str(out), tiny_codec, replace(cfg, fast_fail=True), progress=False)
        return out

    out = interrupted("out")
    assert '"other_part": 2' in _journal(out).read_text().splitlines()[-1]
    resumed = build_shards([str(manifest)], str(out), tiny_codec, replace(cfg, resume=True), progress=False)
    assert {k: resumed[k] for k in ("accepted", "rejected", "split")} == {
        k: whole[k] for k in ("accepted", "rejected", "split")
    }
    assert _ids(out) == _ids(tmp_path / "whole") == {"bob_1", "bob_2", "carol_1", "carol_2"}

    lying = interrupted("lying")
    journal = _journal(lying)
    journal.write_text(journal.read_text().replace('"other_part": 2', '"other_part": 3'))
    with pytest.raises(CheckFailed, match="accounting error.* \\+ 3 of the split's other part != 7 inputs"):
        build_shards([str(manifest)], str(lying), tiny_codec, replace(cfg, resume=True), progress=False)
