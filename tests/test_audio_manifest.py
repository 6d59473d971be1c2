"""Stages: manifest lines -> samples or named rejects; audio file -> 24 kHz mono waveform."""

import json

import numpy as np
import pytest
import soundfile as sf

from higgs_ds.shards.audio import AudioError, load_audio
from higgs_ds.shards.manifest import ManifestSample, Reject, read_manifest

from .conftest import DEMO


@pytest.mark.parametrize(
    "name, native_rate", [("alice_001.flac", 22050), ("alice_004.wav", 16000), ("alice_016.wav", 44100)]
)
def test_load_audio_resamples_to_24k_mono(name, native_rate):
    info = sf.info(DEMO / "audio" / name)
    assert info.samplerate == native_rate
    wave = load_audio(DEMO / "audio" / name, 24000)
    assert wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - round(info.frames * 24000 / native_rate)) <= 1
    assert 0.05 < np.abs(wave).max() <= 1.0


def test_load_audio_errors_name_the_problem(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav", 24000)
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path, 24000)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(tmp_path / "empty.wav", 24000)
    (tmp_path / "junk.flac").write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(tmp_path / "junk.flac", 24000)
    truncated = tmp_path / "truncated.flac"
    truncated.write_bytes((DEMO / "audio" / "alice_001.flac").read_bytes()[:200])
    with pytest.raises(AudioError):
        load_audio(truncated, 24000)


# (file, soundfile format, subtype, native rate, channels): compressed formats and unusual WAVs
FORMATS = [
    ("tone.mp3", "MP3", "MPEG_LAYER_III", 22050, 1),
    ("tone.ogg", "OGG", "VORBIS", 44100, 2),
    ("tone.opus", "OGG", "OPUS", 48000, 1),  # Opus runs at 8/12/16/24/48 kHz only
    ("tone_8k.wav", "WAV", "PCM_16", 8000, 1),
    ("tone_96k.wav", "WAV", "PCM_24", 96000, 2),
    ("six_u8.wav", "WAV", "PCM_U8", 16000, 6),
    ("f64.wav", "WAV", "DOUBLE", 32000, 1),
    ("six.flac", "FLAC", "PCM_24", 48000, 6),
]
TONE_HZ = 440


def write_tone(path, fmt: str, subtype: str, rate: int, channels: int, seconds: float = 0.5) -> None:
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    tone = 0.3 * np.sin(2 * np.pi * TONE_HZ * np.arange(int(seconds * rate)) / rate)
    sf.write(path, np.stack([tone] * channels, axis=1), rate, format=fmt, subtype=subtype)


@pytest.mark.parametrize("name, fmt, subtype, rate, channels", FORMATS)
def test_formats_rates_and_channels_load_as_24k_mono(tmp_path, name, fmt, subtype, rate, channels):
    write_tone(tmp_path / name, fmt, subtype, rate, channels)
    assert (sf.info(tmp_path / name).samplerate, sf.info(tmp_path / name).channels) == (rate, channels)
    wave = load_audio(tmp_path / name, 24000)
    assert wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - 12000) <= 960  # 0.5 s, within one codec frame (lossy codecs pad)
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 24000 / len(wave) - TONE_HZ) < 5  # resampled from the right rate
    assert 0.2 < np.abs(wave).max() < 0.4  # downmixed by averaging, not summing


def test_compressed_formats_build_into_shards(tmp_path, tiny_codec):
    from higgs_ds.shards.build import build_shards
    from higgs_ds.stream.reader import load_index, read_shard

    (tmp_path / "in").mkdir()
    lines = []
    for name, fmt, subtype, rate, channels in FORMATS[:3]:  # mp3, ogg/vorbis, ogg/opus
        write_tone(tmp_path / "in" / name, fmt, subtype, rate, channels, seconds=0.3)
        lines.append(json.dumps({"audio": name, "text": f"A tone in {name}.", "id": name}))
    (tmp_path / "in" / "m.jsonl").write_text("\n".join(lines) + "\n")
    summary = build_shards([str(tmp_path / "in" / "m.jsonl")], str(tmp_path / "out"), tiny_codec, progress=False)
    assert summary["accepted"] == 3 and summary["rejected"] == 0
    shard = tmp_path / "out" / load_index(tmp_path / "out")["shards"][0]["file"]
    ids = []
    for _, record in read_shard(str(shard)):
        (item,) = record["json"]["audio"]
        ids.append(record["json"]["id"])
        assert abs(item["seconds"] - 0.3) <= 0.04, record["json"]["id"]
        assert item["frames"] in (7, 8, 9) and record["codes"].shape == (8, item["frames"])  # 25 Hz: ceil(7.5)
    assert ids == ["tone.mp3", "tone.ogg", "tone.opus"]


GOOD_TTS = {
    "messages": [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": {"type": "audio", "audio_url": "audio/alice_001.flac"}},
    ]
}


def _line(**changes):
    return json.dumps(dict(GOOD_TTS, **changes))


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected an object"),
    (json.dumps({"foo": 1}), "neither ChatML"),
    (_line(messages=[]), "'messages' is missing or empty"),
    (_line(messages=[{"role": "narrator", "content": "x"}]), "unknown role 'narrator'"),
    (_line(messages=[{"role": "user"}]), "no 'content'"),
    (_line(messages=[{"role": "assistant", "content": {"type": "image", "url": "x.png"}}]), "unknown content type"),
    (_line(messages=[{"role": "assistant", "content": {"type": "audio"}}]), "has no 'audio_url'"),
    (_line(messages=[{"role": "user", "content": "only text"}]), "nothing to train on"),
    (
        _line(messages=[{"role": "assistant", "content": {"type": "audio", "audio_url": "../../etc/passwd"}}]),
        "leaves the manifest folder",
    ),
    (_line(start_index=7), "'start_index' must be an integer"),
    (json.dumps({"audio": "audio/bob_001.flac", "text": ""}), "TTS item 'text' is empty"),
]


def test_every_line_is_accepted_or_rejected_with_a_reason(tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [_line()] + [bad for bad, _ in BAD_LINES] + ["", json.dumps({"audio": "audio/bob_001.flac", "text": "Hi"})]
    manifest.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad utf8\n")
    results = list(read_manifest(manifest))
    accepted = [r for r in results if isinstance(r, ManifestSample)]
    rejected = [r for r in results if isinstance(r, Reject)]
    non_blank = sum(1 for line in lines if line.strip()) + 1
    assert len(accepted) + len(rejected) == non_blank == len(results)
    assert [a.line for a in accepted] == [1, len(lines)]  # the first line and the plain-TTS line
    for (bad, reason), reject in zip(BAD_LINES, rejected):
        assert reason in reject.reason, (bad, reject.reason)
    assert "not valid UTF-8" in rejected[-1].reason and rejected[-1].line == len(lines) + 1
    tts = accepted[1].chatml
    assert [m["role"] for m in tts["messages"]] == ["system", "user", "assistant"]


def test_duplicate_ids_are_rejected(tmp_path):
    line = _line(misc={"id": "same"})
    (tmp_path / "m.jsonl").write_text(line + "\n" + line + "\n")
    results = list(read_manifest(tmp_path / "m.jsonl"))
    assert isinstance(results[0], ManifestSample) and isinstance(results[1], Reject)
    assert "duplicate sample id 'same' (first at m.jsonl line 1)" in results[1].reason


def test_demo_manifest_is_clean():
    results = list(read_manifest(DEMO / "manifest.jsonl"))
    assert len(results) >= 40 and all(isinstance(r, ManifestSample) for r in results)
    assert len({r.chatml.get("speaker") for r in results}) >= 2
    clones = [r for r in results if r.chatml.get("start_index")]
    assert clones and all(len(r.audio_paths) == 2 for r in clones)
