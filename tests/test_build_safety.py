"""Issue 10 for `shards build`: a resume only continues the build it interrupted (manifests, codec, settings);
the journal is a strict file that names nothing outside the build; publishing writes are fsynced before the
rename; one builder per directory or slice, and `shards index` never merges under a running slice; the
audio fallback decoder stops just past --max-seconds; a build warning exits 0 and a failed check 1.

Hostile inputs are built here in tmp_path; every refusal names the file and says what to do."""

import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from higgs_ds.errors import CheckFailed, UserError
from higgs_ds.shards.build import BuildConfig, BuildError, build_shards, merge_slices
from higgs_ds.stream.reader import load_index

from .conftest import REPO

SIX = ["alice_1", "alice_2", "bob_1", "bob_2", "carol_1", "carol_2"]
FRESH = "another --out"


def _manifest(folder: Path, ids: list[str], extra: tuple = (), bad_line: int | None = None) -> Path:
    """Plain TTS lines over short tones (encoding is the slow part of a build), then `extra` lines; with
    bad_line, invalid JSON as that line."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sid in enumerate(ids):
        seconds = 0.2 + 0.04 * i
        sf.write(folder / f"{sid}.wav", 0.3 * np.sin(np.arange(int(seconds * 16000)) * (0.05 + 0.01 * i)), 16000)
        lines.append(json.dumps({"audio": f"{sid}.wav", "text": f"sentence {i}", "speaker": sid[:3], "id": sid}))
    if bad_line is not None:
        lines.insert(bad_line - 1, "{bad json")
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines + [x if isinstance(x, str) else json.dumps(x) for x in extra]) + "\n")
    return path


def _interrupted(tmp_path: Path, tiny_codec) -> tuple[Path, Path]:
    """A build stopped (--fast-fail on the bad line 5) after two complete shards of two samples."""
    manifest = _manifest(tmp_path / "in", SIX, bad_line=5)
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="invalid JSON"):
        build_shards(
            [str(manifest)], str(out), tiny_codec, BuildConfig(shard_samples=2, fast_fail=True), progress=False
        )
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    return manifest, out


def _snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _journal(out: Path) -> Path:
    (journal,) = [p for p in out.iterdir() if "journal" in p.name]
    return journal


# ---------------------------------------------------------------- finding 6: resume checks what it resumes


@pytest.mark.timeout(300)
def test_resume_refuses_other_manifests_codec_or_settings(tmp_path, tiny_codec, tiny_model_dir):
    manifest, out = _interrupted(tmp_path, tiny_codec)
    before = _snapshot(out)
    resume = BuildConfig(shard_samples=2, resume=True)

    other_codec = dataclasses.replace(tiny_codec, provenance=dict(tiny_codec.provenance, weights_sha256="0" * 64))
    changed_settings = {
        "codec.weights_sha256": (other_codec, resume),
        "settings.max_seconds": (tiny_codec, dataclasses.replace(resume, max_seconds=10.0)),
        "settings.shard_samples": (tiny_codec, dataclasses.replace(resume, shard_samples=3)),
        "settings.min_shards": (tiny_codec, dataclasses.replace(resume, min_shards=2)),
        "tokenizer": (tiny_codec, dataclasses.replace(resume, tokenizer=str(tiny_model_dir))),
    }
    for what, (codec, cfg) in changed_settings.items():
        with pytest.raises(BuildError) as err:
            build_shards([str(manifest)], str(out), codec, cfg, progress=False)
        message = str(err.value)
        assert what in message and str(_journal(out)) in message and FRESH in message, message

    # the same lines with one text changed: same count, other content
    text = manifest.read_text()
    manifest.write_text(text.replace("sentence", "Sentence", 1))
    with pytest.raises(BuildError, match=r"manifests\[0\]\.sha256") as err:
        build_shards([str(manifest)], str(out), tiny_codec, resume, progress=False)
    assert "same manifests" in str(err.value)
    assert _snapshot(out) == before  # nothing written, nothing removed by a refused resume

    manifest.write_text(text)  # the original inputs: the resume goes on and completes
    summary = build_shards([str(manifest)], str(out), tiny_codec, resume, progress=False)
    assert summary["accepted"] == 6 and summary["rejected"] == 1
    # a requeued job resuming the finished build with other inputs is refused, not told "already complete"
    with pytest.raises(BuildError, match="complete build of other inputs") as err:
        build_shards(
            [str(manifest)], str(out), tiny_codec, dataclasses.replace(resume, max_seconds=5.0), progress=False
        )
    assert "index.json" in str(err.value) and FRESH in str(err.value)
    again = build_shards([str(manifest)], str(out), tiny_codec, resume, progress=False)
    assert again.get("already_complete") is True


@pytest.mark.timeout(300)
def test_slices_of_other_inputs_are_not_merged(tmp_path, tiny_codec):
    manifest = _manifest(tmp_path / "in", SIX[:4])
    out = tmp_path / "out"
    for i, max_seconds in ((0, 30.0), (1, 20.0)):
        cfg = BuildConfig(slice_index=i, num_slices=2, max_seconds=max_seconds)
        build_shards([str(manifest)], str(out), tiny_codec, cfg, progress=False)
    with pytest.raises(BuildError, match="different manifests or settings") as err:
        merge_slices(str(out))
    assert str(out) in str(err.value) and "rebuild every slice" in str(err.value)
    assert not (out / "index.json").exists()


@pytest.mark.timeout(300)
def test_a_journal_naming_a_device_or_a_link_is_refused_without_hanging(tmp_path, tiny_codec):
    manifest, out = _interrupted(tmp_path, tiny_codec)
    journal = _journal(out)
    genuine = journal.read_text()
    resume = BuildConfig(shard_samples=2, resume=True)

    journal.write_text(genuine.replace('"shard-000001.tar"', '"/dev/zero"'))  # hashing it would never end
    with pytest.raises(BuildError, match="shard-000001.tar") as err:
        build_shards([str(manifest)], str(out), tiny_codec, resume, progress=False)
    assert str(journal) in str(err.value) and FRESH in str(err.value)

    journal.write_text(genuine.replace('"shard-000001.tar"', '"../../outside.tar"'))
    with pytest.raises(BuildError, match=str(journal)):
        build_shards([str(manifest)], str(out), tiny_codec, resume, progress=False)

    journal.write_text(genuine)
    (out / "shard-000000.tar").unlink()
    (out / "shard-000000.tar").symlink_to("/dev/zero")
    with pytest.raises(BuildError, match="not a regular file") as err:
        build_shards([str(manifest)], str(out), tiny_codec, resume, progress=False)
    assert str(out / "shard-000000.tar") in str(err.value) and "empty --out" in str(err.value)
    assert os.path.islink(out / "shard-000000.tar")  # refused, not replaced


@pytest.mark.timeout(300)
def test_a_journal_cut_by_a_kill_resumes_after_its_last_whole_line(tmp_path, tiny_codec):
    manifest, out = _interrupted(tmp_path, tiny_codec)
    whole = tmp_path / "whole"
    build_shards([str(manifest)], str(whole), tiny_codec, BuildConfig(shard_samples=2), progress=False)
    journal = _journal(out)
    journal.write_bytes(journal.read_bytes()[:-40])  # the second shard's line half written
    summary = build_shards([str(manifest)], str(out), tiny_codec, BuildConfig(shard_samples=2, resume=True))
    assert summary["accepted"] == 6 and summary["rejected"] == 1
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "rejects.jsonl"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- finding 7: durable writes, one builder


@pytest.mark.timeout(300)
def test_published_files_are_fsynced_before_the_rename(tmp_path, tiny_codec, monkeypatch):
    manifest = _manifest(tmp_path / "in", SIX[:2], ("{bad",))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    build_shards([str(manifest)], str(out), tiny_codec, BuildConfig(shard_samples=1), progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar", "index.samples.npy", "index.json", "rejects.jsonl"):
        final = os.path.realpath(out / name)
        renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final]
        assert len(renames) == 1, (name, events)
        src = events[renames[0]][1]
        assert ("fsync", src) in events[: renames[0]], f"{name} was renamed into place before it was fsynced"
        assert ("fsync", os.path.realpath(out)) in events[renames[0] :], f"{out} not fsynced after {name}"
    temps = [e[1] for e in events if e[0] == "replace"]
    assert len(set(temps)) == len(temps)


def _paused_build(monkeypatch, manifest: Path, out: Path, cfg: BuildConfig, codec):
    """Start a build in a thread that stops inside its first encode (holding whatever it holds) until
    released; returns (release, thread, errors)."""
    import higgs_ds.shards.build as shard_build

    entered, release, errors = threading.Event(), threading.Event(), []
    real = shard_build.encode_chunk

    def encode_chunk(chunk, cfg):
        if threading.current_thread().name == "paused-builder":
            entered.set()
            release.wait(timeout=250)  # released by the test; bounded below its own 300 s timeout
        return real(chunk, cfg)

    monkeypatch.setattr(shard_build, "encode_chunk", encode_chunk)

    def run():
        try:
            build_shards([str(manifest)], str(out), codec, cfg, progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    thread = threading.Thread(target=run, name="paused-builder")
    thread.start()
    assert entered.wait(timeout=60), "the first build never started encoding"
    return release, thread, errors


@pytest.mark.timeout(300)
def test_two_builders_of_one_slice_fail_at_once_and_merge_waits_for_slices(tmp_path, tiny_codec, monkeypatch):
    manifest = _manifest(tmp_path / "in", SIX[:4])
    out = tmp_path / "out"
    slice0 = BuildConfig(slice_index=0, num_slices=2)
    release, thread, errors = _paused_build(monkeypatch, manifest, out, slice0, tiny_codec)
    try:
        # another slice of the same job array runs in parallel
        build_shards([str(manifest)], str(out), tiny_codec, dataclasses.replace(slice0, slice_index=1))
        # a second builder of slice 0, fresh or resuming, fails at once naming the holder
        for cfg in (slice0, dataclasses.replace(slice0, resume=True)):
            with pytest.raises(UserError, match=f"locked by pid {os.getpid()}") as err:
                build_shards([str(manifest)], str(out), tiny_codec, cfg, progress=False)
            assert str(out) in str(err.value) and "wait for it to finish" in str(err.value)
        with pytest.raises(UserError, match="locked by") as err:  # not merged under a running slice
            merge_slices(str(out))
        assert not (out / "index.json").exists() and not (out / "rejects.jsonl").exists()
    finally:
        release.set()
        thread.join(timeout=120)
    assert errors == []
    assert merge_slices(str(out))["accepted"] == 4
    assert load_index(out)["num_samples"] == 4


@pytest.mark.timeout(300)
def test_two_whole_builds_into_one_directory_do_not_interleave(tmp_path, tiny_codec, monkeypatch):
    manifest = _manifest(tmp_path / "in", SIX[:2])
    out = tmp_path / "out"
    release, thread, errors = _paused_build(monkeypatch, manifest, out, BuildConfig(), tiny_codec)
    try:
        with pytest.raises(UserError, match="locked by") as err:
            build_shards([str(manifest)], str(out), tiny_codec, BuildConfig(), progress=False)
        assert "another shard build" in str(err.value)
    finally:
        release.set()
        thread.join(timeout=120)
    assert errors == [] and load_index(out)["num_samples"] == 2


# ---------------------------------------------------------------- finding 9: the fallback decoder is bounded


def _sparse_au(path: Path, *, channels: int, rate: int, size: int) -> Path:
    """A Sun AU file of 16-bit PCM without a declared length, `size` bytes of which all but the header are a
    hole: nothing on disk, zeros to a decoder. libsndfile refuses more than 1024 channels; the standard
    library's sunau (audioread's fallback) reads it."""
    with open(path, "wb") as f:
        f.write(struct.pack(">4sIIIII", b".snd", 24, 0xFFFFFFFF, 3, rate, channels))
        f.truncate(size)
    return path


_LOAD_UNDER_LIMIT = """
import resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from higgs_ds.shards.audio import AudioError, load_audio
try:
    load_audio(sys.argv[1], 24000, max_seconds=float(sys.argv[2]))
    print("ACCEPTED")
except AudioError as err:
    print("REJECTED", err)
"""


@pytest.mark.timeout(300)
def test_fallback_decoder_stops_past_max_seconds_within_a_memory_limit(tmp_path):
    # 8 GiB of zeros to a decoder (16 GiB as float32), over an hour of audio: decoding it all exhausts the limit
    long_au = _sparse_au(tmp_path / "hours.au", channels=1025, rate=1000, size=8 << 30)
    fast_rate = _sparse_au(tmp_path / "fast.au", channels=1, rate=2**31 - 1, size=8 << 30)  # libsndfile reads it
    limit = 1 << 30
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for path, expected in ((long_au, "over --max-seconds 2"), (fast_rate, "sample rate of 2147483647 Hz")):
        run = subprocess.run(
            [sys.executable, "-c", _LOAD_UNDER_LIMIT, str(path), "2", str(limit)],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.startswith("REJECTED"), run.stdout
        assert expected in run.stdout and str(path) in run.stdout, run.stdout
        assert "cut it shorter" in run.stdout or "re-encode" in run.stdout, run.stdout
    assert os.stat(long_au).st_blocks * 512 < 1 << 20  # the test itself wrote next to nothing


@pytest.mark.timeout(300)
def test_fallback_over_long_audio_is_a_named_reject(tmp_path, tiny_codec):
    long = {"audio": "long.au", "text": "a file only the fallback reads", "id": "long"}
    manifest = _manifest(tmp_path / "in", SIX[:1], (long,))
    _sparse_au(tmp_path / "in" / "long.au", channels=1025, rate=1000, size=16 << 20)  # 8 s
    out = tmp_path / "out"
    summary = build_shards([str(manifest)], str(out), tiny_codec, BuildConfig(max_seconds=2.0), progress=False)
    assert summary["accepted"] == 1 and summary["rejected"] == 1
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["sample_id"] == "long" and reject["line"] == 2
    assert "over --max-seconds 2" in reject["reason"] and "long.au" in reject["reason"]
    assert "cut it shorter" in reject["reason"]


# ---------------------------------------------------------------- finding 13: exit codes of `shards build`


@pytest.mark.timeout(300)
def test_build_warning_exits_0_and_a_failed_accounting_check_exits_1(tmp_path, tiny_codec, capsys):
    from higgs_ds.cli import main

    manifest = _manifest(tmp_path / "in", SIX[:2], ("{bad",))
    code = main(
        ["shards", "build", str(manifest), "--out", str(tmp_path / "few"), "--codec", "tiny", "--min-shards", "8"]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "higgs-ds: warning: only 2 shards for --min-shards 8" in err and "--shard-size" in err
    assert (tmp_path / "few" / "index.json").is_file()

    manifest, out = _interrupted(tmp_path, tiny_codec)
    journal = _journal(out)
    journal.write_text(journal.read_text().replace('"accepted": 4', '"accepted": 5'))  # a count that lies
    with pytest.raises(CheckFailed, match="accounting") as check:
        build_shards([str(manifest)], str(out), tiny_codec, BuildConfig(shard_samples=2, resume=True))
    assert str(out) in str(check.value)
    capsys.readouterr()
    code = main(
        ["shards", "build", str(manifest), "--out", str(out), "--codec", "tiny", "--shard-size", "2", "--resume"]
    )
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: the one line of the policy
    assert last.startswith("higgs-ds: check failed: accounting error in ") and str(out) in last
