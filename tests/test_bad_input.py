"""Hostile and unlucky input: every line of an adversarial corpus ends in a shard or in rejects.jsonl with a
named reason, never a crash; accepted + rejected = input lines in every mode (workers, slices, CLI)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from higgs_ds.errors import UserError
from higgs_ds.shards.build import BuildConfig, BuildError, build_shards, merge_slices
from higgs_ds.stream.reader import load_index

from .conftest import REPO

MAX_SECONDS = 2.0
SR = 16000


def _tone(seconds: float, sr: int = SR) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * sr)) / sr)


def _write_audio(audio: Path, outside: Path) -> None:
    """Two good clips (short: encoding is the slow part; formats, rates and channel counts are tested in
    test_audio_manifest.py) and broken files of every kind."""
    audio.mkdir(parents=True)
    sf.write(audio / "good.wav", _tone(0.2), SR)
    sf.write(audio / "silence.wav", np.zeros(SR // 5), SR)  # silence is valid audio: accepted
    sf.write(audio / "good.flac", _tone(0.5), SR)
    sf.write(audio / "good.mp3", _tone(1.0), SR, format="MP3")
    sf.write(audio / "long.wav", _tone(MAX_SECONDS + 1), SR)
    sf.write(audio / "tiny.wav", _tone(0.01), SR)  # 10 ms: less than one 40 ms codec frame
    sf.write(audio / "no_frames.wav", np.zeros(0), SR)  # a valid header and nothing after it
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        wave = _tone(0.5)
        wave[100] = value
        sf.write(audio / name, wave, SR, subtype="FLOAT")
    wav = (audio / "good.wav").read_bytes()
    (audio / "claims_more.wav").write_bytes(wav[: len(wav) // 2])  # header announces twice what is there
    (audio / "header_only.wav").write_bytes(wav[:20])  # cut inside the header
    flac = (audio / "good.flac").read_bytes()
    (audio / "cut.flac").write_bytes(flac[: len(flac) // 2])
    mp3 = (audio / "good.mp3").read_bytes()
    (audio / "cut.mp3").write_bytes(mp3[: len(mp3) * 2 // 3])  # decodes, but stops short of the length announced
    (audio / "header_only.mp3").write_bytes(mp3[:300])
    (audio / "empty.wav").write_bytes(b"")
    (audio / "text.wav").write_text("this is a text file, renamed to .wav\n" * 20)
    (audio / "folder.wav").mkdir()
    os.mkfifo(audio / "fifo.wav")  # opening it would block the build forever
    sf.write(outside / "secret.wav", _tone(0.5), SR)
    (audio / "link_out.wav").symlink_to(outside / "secret.wav")
    (audio / "link_in.wav").symlink_to(audio / "good.wav")


def chat(url, **extra) -> dict:
    content = {"type": "audio", "audio_url": url} if isinstance(url, str) else url
    return {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": content}], **extra}


def tts(audio="audio/good.wav", text="Hello there.", **extra) -> dict:
    return {"audio": audio, "text": text, **extra}


def msgs(*messages, **extra) -> dict:
    return {"messages": list(messages), **extra}


ASSISTANT_AUDIO = {"role": "assistant", "content": {"type": "audio", "audio_url": "audio/good.wav"}}

# (manifest line: dict -> JSON, str or bytes as written; None = accepted, else a part of the reject reason)
CASES = [
    (tts(id="first"), None),  # written after a byte-order mark: accepted
    (tts(id="crlf"), None),  # written with a CRLF ending
    (tts("audio/silence.wav", id="silence"), None),
    (tts("audio/link_in.wav", id="link_in"), None),  # a symlink that stays inside the folder is fine
    (tts(id="long text", text="word " * 20000), None),  # length is the trainer's concern, not the builder's
    (tts(id="a/b/../../c.json"), None),  # ids never become file or member names
    (tts(id=7), None),
    (chat("audio/good.wav", speaker="alice", start_index=1, misc={"id": "chat"}), None),
    # JSON that is not a manifest object
    ("[1, 2]", "line is a JSON list, expected an object"),
    ("42", "line is a JSON int, expected an object"),
    ('"just a string"', "line is a JSON str, expected an object"),
    ("null", "line is a JSON NoneType, expected an object"),
    ("{not json", "invalid JSON"),
    ('{"audio": "audio/good.wav", "text": "x"} {"audio": "b"}', "invalid JSON: Extra data"),
    ('{"audio": "audio/good.wav", "text": NaN}', "NaN is not a JSON value"),
    ("[" * 100_000, "invalid JSON: nested too deeply"),
    ('{"id": ' + "9" * 5000 + "}", "invalid JSON"),
    (b"\xff\xfe\x00binary\x00junk", "not valid UTF-8"),
    ("\u00a0", "invalid JSON"),  # a no-break space only: not blank to the byte counter, so it is a line
    ("\x1c\x1d", "invalid JSON"),
    ('{"audio": "audio/good.wav", "text": "\\ud800"}', "unpaired UTF-16 surrogate"),
    ({"foo": 1}, "neither ChatML"),
    # messages
    ({"messages": []}, "'messages' is missing or empty"),
    ({"messages": None, "id": "null messages"}, "'messages' is missing or empty"),
    ({"messages": "hello"}, "'messages' must be a list of messages, got str"),
    ({"messages": {"role": "user"}}, "'messages' must be a list of messages, got dict"),
    (msgs("hello", ASSISTANT_AUDIO), "messages[0] is not an object"),
    (msgs({"content": "hi"}, ASSISTANT_AUDIO), "messages[0]: no 'role'"),
    (msgs({"role": 5, "content": "hi"}, ASSISTANT_AUDIO), "messages[0]: unknown role 5"),
    (msgs({"role": ["user"], "content": "hi"}, ASSISTANT_AUDIO), "messages[0]: unknown role ['user']"),
    (msgs({"role": "narrator", "content": "hi"}, ASSISTANT_AUDIO), "unknown role 'narrator'"),
    (msgs({"role": "user", "content": None}, ASSISTANT_AUDIO), "messages[0]: no 'content'"),
    (msgs({"role": "user", "content": 5}, ASSISTANT_AUDIO), "content must be a string or an object with a 'type'"),
    (msgs({"role": "user", "content": [["nested"]]}, ASSISTANT_AUDIO), "content[0]: content must be a string"),
    (msgs({"role": "user", "content": [1]}, ASSISTANT_AUDIO), "got int"),
    (msgs({"role": "user", "content": []}, ASSISTANT_AUDIO), "empty content list"),
    (msgs({"role": "user", "content": {"text": "hi"}}, ASSISTANT_AUDIO), "content object has no 'type'"),
    (msgs({"role": "user", "content": {"type": "text", "text": 3}}, ASSISTANT_AUDIO), "needs a string 'text'"),
    (chat({"type": "image", "url": "x.png"}), "unknown content type 'image'"),
    (chat({"type": "audio"}), "audio item has no 'audio_url'"),
    (chat({"type": "audio", "audio_url": ""}), "'audio_url' is empty"),
    (chat({"type": "audio", "audio_url": 5}), "'audio_url' must be a file path string, got int"),
    (chat({"type": "audio", "audio_url": "audio/good.wav", "raw_audio": "UklGR"}), "inline raw_audio"),
    (chat({"type": "audio", "audio_url": "audio/good.wav", "volume": 2}), "unknown keys ['volume']"),
    (msgs({"role": "user", "content": "hi", "recipient": "x"}, ASSISTANT_AUDIO), "'recipient' is only allowed"),
    (msgs({"role": "user", "content": "only text"}), "nothing to train on"),
    (msgs({"role": "user", "content": {"type": "audio", "audio_url": "audio/good.wav"}}), "nothing to train on"),
    (chat("audio/good.wav", start_index=2), "'start_index' must be an integer in [0, 1] (got 2)"),
    (chat("audio/good.wav", start_index=-1), "'start_index' must be an integer"),
    (chat("audio/good.wav", start_index="1"), "'start_index' must be an integer"),
    (chat("audio/good.wav", start_index=True), "'start_index' must be an integer"),
    (chat("audio/good.wav", start_index=1.0), "'start_index' must be an integer"),
    (msgs(ASSISTANT_AUDIO, {"role": "user", "content": "x"}, start_index=1), "nothing to train on"),
    (chat("audio/good.wav", speaker=5), "'speaker' must be a string, got int"),
    (chat("audio/good.wav", speaker={"name": "a"}), "'speaker' must be a string, got dict"),
    (chat("audio/good.wav", misc="x"), "'misc' must be an object"),
    # plain TTS lines
    ({"audio": "audio/good.wav"}, "TTS item has no 'text'"),
    ({"text": "hi"}, "TTS item has no 'audio'"),
    (tts(text="  \t "), "TTS item 'text' is empty"),
    (tts(text=5), "TTS item 'text' must be a string, got int"),
    (tts(audio={"path": "audio/good.wav"}), "TTS item 'audio' must be a string, got dict"),
    (tts(audio=""), "TTS item 'audio' is empty"),
    # ids
    (tts(id="first"), "duplicate sample id 'first' (first at bad.jsonl line 1)"),
    (tts(id=["a"]), "sample id must be a string or an integer, got list"),
    (tts(id=""), "sample id is empty"),
    (tts(id=True), "sample id must be a string or an integer, got bool"),
    # paths
    (tts("audio/missing.wav"), "audio file not found"),
    (tts("../outside/secret.wav"), "leaves the manifest folder"),
    (tts("audio/../../outside/secret.wav"), "leaves the manifest folder"),
    (tts("/etc/hostname"), "leaves the manifest folder"),
    (tts("audio/link_out.wav"), "is a symlink leading out of the manifest folder"),
    (tts("file:///etc/hostname"), "is a URL; only local files are read"),
    (tts("http://example.com/a.wav"), "is a URL; only local files are read"),
    (tts("data:audio/wav;base64,UklGRg=="), "is a URL"),
    (tts("audio/good\u0000.wav"), "contains a NUL character"),
    (tts("audio/folder.wav"), "audio path is a directory"),
    (tts("audio/fifo.wav"), "not a regular file"),
    (tts("audio/" + "x" * 5000 + ".wav"), "audio file cannot be opened (File name too long)"),
    # audio content
    (tts("audio/empty.wav"), "audio file is empty (0 bytes)"),
    (tts("audio/text.wav"), "cannot decode audio: corrupt, truncated or not an audio format"),
    (tts("audio/header_only.wav"), "cannot decode audio"),
    (tts("audio/claims_more.wav"), "audio file is truncated (the header announces"),
    (tts("audio/cut.flac"), "cannot decode audio: corrupt, truncated"),
    (tts("audio/cut.mp3"), "audio file is truncated (1.00 s announced"),
    (tts("audio/header_only.mp3"), "cannot decode audio: corrupt, truncated or not an audio format we read"),
    (tts("audio/nan.wav"), "NaN or infinite samples"),
    (tts("audio/inf.wav"), "NaN or infinite samples"),
    (tts("audio/no_frames.wav"), "audio has no samples"),
    (tts("audio/tiny.wav"), "audio is 0.010 s, shorter than the minimum 0.040 s"),
    (tts("audio/long.wav"), "audio is 3.0 s, over --max-seconds 2"),
]


def _encode_line(line) -> bytes:
    if isinstance(line, bytes):
        return line
    return (line if isinstance(line, str) else json.dumps(line)).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """bad.jsonl: the cases (a BOM first, a CRLF line, blank lines between); returns (manifest, {line: expected})."""
    root = tmp_path_factory.mktemp("bad-corpus")
    (root / "outside").mkdir()
    _write_audio(root / "data" / "audio", root / "outside")
    lines, expected = [b"\xef\xbb\xbf" + _encode_line(CASES[0][0]) + b"\n"], {1: CASES[0][1]}
    lines.append(_encode_line(CASES[1][0]) + b"\r\n")
    expected[2] = CASES[1][1]
    for line, want in CASES[2:]:
        if len(lines) % 10 == 0:
            lines.append(b"  \t\r\n")  # blank lines are not inputs
        lines.append(_encode_line(line) + b"\n")
        expected[len(lines)] = want
    lines.append(_encode_line(tts(str(root / "data" / "audio" / "good.wav"), id="absolute inside")) + b"\n")
    expected[len(lines)] = None  # an absolute path inside the manifest folder is fine
    manifest = root / "data" / "bad.jsonl"
    manifest.write_bytes(b"".join(lines) + b"\n\n")
    return manifest, expected


def _rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _accepted_lines(out: Path) -> list[int]:
    lines = []
    for shard in load_index(out)["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            for member in tar:
                assert member.name.split(".")[0].isdigit(), member.name  # keys stay ordinals, whatever the id
                if member.name.endswith(".json"):
                    lines.append(json.loads(tar.extractfile(member).read())["source"]["line"])
    return lines


def test_every_bad_line_gets_its_named_reason(tmp_path, corpus, tiny_codec):
    manifest, expected = corpus
    summary = build_shards(
        [str(manifest)],
        str(tmp_path),
        tiny_codec,
        BuildConfig(max_seconds=MAX_SECONDS, shard_samples=8),
        progress=False,
    )
    rejects = {r["line"]: r for r in _rejects(tmp_path / "rejects.jsonl")}
    assert sorted(_accepted_lines(tmp_path)) == sorted(n for n, want in expected.items() if want is None)
    assert summary["accepted"] + summary["rejected"] == summary["inputs"] == len(expected)
    for number, want in expected.items():
        if want is not None:
            assert number in rejects, (number, want)
            assert want in rejects[number]["reason"], (number, want, rejects[number]["reason"])
            assert rejects[number]["manifest"] == str(manifest)
    by_reason = {want: rejects[n] for n, want in expected.items() if want is not None}
    assert by_reason["line is a JSON list, expected an object"]["sample_id"] is None  # no id to read
    assert by_reason["duplicate sample id 'first' (first at bad.jsonl line 1)"]["sample_id"] == "first"
    no_id = by_reason["TTS item has no 'text'"]
    assert no_id["sample_id"] == f"bad:{no_id['line']}"  # no id given: MANIFEST:LINE
    kinds = summary["rejected_by_reason"]
    assert kinds["unknown role '…'"] == 1 and kinds["unknown role N"] == 1  # user values generalised
    assert kinds["'start_index' must be an integer in [N, N]"] == 5 and kinds["audio file is truncated"] == 2
    assert kinds["'audio_url' '…' is a URL; only local files are read"] == 3
    assert sum(kinds.values()) == summary["rejected"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "higgs_ds.cli", "shards", "build", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_cli_with_workers_accounts_for_every_line(tmp_path, corpus, tiny_codec):
    manifest, expected = corpus
    run = _cli(str(manifest), "--out", str(tmp_path), "--codec", "tiny", "--workers", "2", "--max-seconds", "2")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["inputs"] == len(expected) and summary["accepted"] == sum(w is None for w in expected.values())
    assert len(_rejects(tmp_path / "rejects.jsonl")) == summary["rejected"] == len(expected) - summary["accepted"]


def test_fast_fail_stops_with_one_line_naming_the_line(tmp_path, corpus, capsys):
    from higgs_ds.cli import main

    manifest, expected = corpus
    first_bad = min(n for n, want in expected.items() if want is not None)
    assert main(["shards", "build", str(manifest), "--out", str(tmp_path), "--codec", "tiny", "--fast-fail"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{manifest}:{first_bad} (sample None): {expected[first_bad]}" in errors[0], err
    assert not (tmp_path / "index.json").exists()


def test_slices_account_for_every_line(tmp_path, corpus, tiny_codec):
    manifest, expected = corpus
    for i in range(2):
        cfg = BuildConfig(max_seconds=MAX_SECONDS, slice_index=i, num_slices=2)
        build_shards([str(manifest)], str(tmp_path), tiny_codec, cfg, progress=False)
    summary = merge_slices(str(tmp_path))
    assert summary["inputs"] == len(expected) == summary["accepted"] + summary["rejected"]
    assert sorted(r["line"] for r in _rejects(tmp_path / "rejects.jsonl")) == sorted(
        n for n, want in expected.items() if want is not None
    )


def test_unreadable_manifests_stop_the_build_with_a_reason(tmp_path, tiny_codec):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "folder.jsonl").mkdir()
    cases = {
        "missing.jsonl": "manifest not found",
        "folder.jsonl": "is a directory; pass the .jsonl files inside it",
        "empty.jsonl": "hold no non-blank lines",
    }
    for name, reason in cases.items():
        with pytest.raises(UserError, match=reason):  # no line to reject: the build stops before it starts
            build_shards([str(tmp_path / name)], str(tmp_path / "out"), tiny_codec, BuildConfig(), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="is a file, not a directory"):
        build_shards([str(tmp_path / "empty.jsonl")], str(tmp_path / "file"), tiny_codec, BuildConfig(), progress=False)


def test_binary_manifest_is_rejected_line_by_line(tmp_path, tiny_codec):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (tmp_path / "m.jsonl.gz").write_bytes(data)
    with pytest.raises(BuildError, match=r"none of the \d+ input lines was accepted"):
        build_shards([str(tmp_path / "m.jsonl.gz")], str(tmp_path / "out"), tiny_codec, BuildConfig(), progress=False)
    rejects = _rejects(tmp_path / "out" / "rejects.jsonl")
    assert len(rejects) == sum(1 for line in data.split(b"\n") if line.strip())
    assert all("not valid UTF-8" in r["reason"] or "invalid JSON" in r["reason"] for r in rejects)


def test_manifest_name_that_is_not_utf8_is_written_escaped(tmp_path, tiny_codec):
    """Linux file names are bytes; one that is not UTF-8 once crashed the UTF-8 writers of shards and rejects."""
    sf.write(tmp_path / "good.wav", _tone(0.2), SR)
    manifest = tmp_path / os.fsdecode(b"caf\xe9.jsonl")  # Latin-1 name
    manifest.write_text(json.dumps(tts("good.wav", id="ok")) + "\n{broken\n")
    summary = build_shards([str(manifest)], str(tmp_path / "out"), tiny_codec, BuildConfig(), progress=False)
    assert summary["accepted"] == 1 and summary["rejected"] == 1
    (reject,) = _rejects(tmp_path / "out" / "rejects.jsonl")
    assert reject["manifest"] == str(manifest) and reject["line"] == 2
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        record = json.loads(tar.extractfile("000000000.json").read())
    assert record["source"]["manifest"] == str(manifest) and record["id"] == "ok"
