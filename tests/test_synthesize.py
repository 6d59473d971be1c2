"""`higgs-ds synthesize` on this environment's tiny real model and tiny codec (native in .venv, boson's
HiggsAudioModel in .venv-boson: `both_envs`): plain TTS, cloning from a demo recording, a dialogue with a
reference per speaker and a scene, and a batch JSONL with bad lines. The expected values come from other
paths than the command's: conversations and prompt tokens written out by hand, reference codes from
soundfile + soxr + the codec, generation through generate_codes (and, for hand-made tokens, the family's own
loop), waveforms from the codec's decode."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from higgs_ds.cli import main
from higgs_ds.errors import UserError
from higgs_ds.eval.synth_request import Defaults, Reference, SynthRequest, prompt_record, read_batch
from higgs_ds.eval.synthesize import Sampling, encode_reference, find_codec, synthesize

from .conftest import DEMO, demo_lines, write_manifest

pytestmark = pytest.mark.both_envs

AUDIO = DEMO / "audio"
MAX = 12  # frames generated per prompt: enough to tell prompts apart, short enough for 2 cores
SYSTEM = "Generate audio following instruction."
TEXT = "Rice is often served in round bowls."
ALICE = "The birch canoe slid on the smooth planks."  # what alice_001.flac says (demo manifest)
BOB = "The soft cushion broke the man's fall."  # bob_002.flac
DIALOGUE = "[SPEAKER0] Are you coming tonight? [SPEAKER1] Only if it stops raining."
SCENE = "A quiet office, two colleagues talk."
ALICE_REF = ["--ref-audio", str(AUDIO / "alice_001.flac"), "--ref-text", ALICE]
# generate_codes' keyword arguments for Sampling() with max_new_frames=MAX, spelled out
SETTINGS = dict(max_new_frames=MAX, temperature=0.7, top_k=None, top_p=0.95, ras_win_len=7, ras_win_max_num_repeat=2)


def _lines(folder: Path) -> list:
    alice = {"audio": str(AUDIO / "alice_001.flac"), "text": ALICE}
    bob = {"audio": str(AUDIO / "bob_002.flac"), "text": BOB}
    return [
        {"id": "tts", "text": TEXT},  # line 1
        {"id": "clone", "text": TEXT, "reference": alice, "seed": 5},  # 2
        {"id": "dialogue", "text": DIALOGUE, "scene": SCENE, "references": [alice, bob]},  # 3
        "{not json",  # 4
        {"id": "typo", "txt": TEXT},  # 5
        {"id": "noise", "text": TEXT, "reference": {"audio": "noise.wav", "text": ALICE}},  # 6: relative path
        {"id": "empty", "text": "  [SPEAKER0] "},  # 7
        {"id": "three", "text": "[SPEAKER0] a [SPEAKER2] b", "references": [alice, bob]},  # 8
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_codec):
    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("synth")
    (folder / "noise.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot audio at all")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in _lines(folder)) + "\n")
    batch = read_batch(prompts, Defaults())
    said = []
    result = synthesize(
        tiny_model_dir,
        batch.requests,
        folder / "out",
        Sampling(max_new_frames=MAX),
        codec="tiny",
        refused=batch.refused,
        say=said.append,
        progress=False,
    )
    return SimpleNamespace(folder=folder, out=folder / "out", result=result, said=said, batch=batch)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from tests.envs import load_tiny

    tokenizer, _, model = load_tiny(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def ref_codes(tiny_codec):
    return {name: _reference_codes(tiny_codec, AUDIO / name) for name in ("alice_001.flac", "bob_002.flac")}


def _codes(out: Path, name: str) -> np.ndarray:
    return np.load(out / f"{name}.codes.npy", allow_pickle=False)


def _reference_codes(codec, path: Path) -> np.ndarray:
    """Independent of the command's loader: soundfile, a channel mean, soxr HQ to 24 kHz, the codec."""
    import soxr

    wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wave = soxr.resample(wave.mean(axis=1), rate, 24000, quality="HQ").astype(np.float32)
    return codec.encode(wave)


def _audio_turn(url):
    return {"role": "assistant", "content": {"type": "audio", "audio_url": url}}


def _record(messages: list, refs: list[np.ndarray]) -> dict:
    codes = np.concatenate(refs, axis=1) if refs else np.zeros((8, 0), np.uint16)
    return {"json": {"id": "expected", "messages": messages, "audio": [{"frames": c.shape[1]} for c in refs]},
            "codes": codes}  # fmt: skip


def test_every_line_is_written_or_refused_by_name(run):
    written = {e["id"]: e for e in run.result["written"]}
    refused = {r.line: r.reason for r in run.result["refused"]}
    assert sorted(written) == ["clone", "dialogue", "tts"]
    assert sorted(refused) == [4, 5, 6, 7, 8] and len(written) + len(refused) == run.batch.lines == 8
    assert "invalid JSON" in refused[4]
    assert "'txt'" in refused[5]
    assert "reference 0" in refused[6] and str(run.folder / "noise.wav") in refused[6]  # relative to the JSONL
    assert "text is empty" in refused[7]
    assert "[SPEAKER2]" in refused[8] and "2 references" in refused[8]
    for line in refused:
        assert any(m.startswith(f"{run.folder / 'prompts.jsonl'} line {line}: refused:") for m in run.said)
    manifest = [json.loads(x) for x in (run.out / "synthesize.jsonl").read_text().splitlines()]
    assert [e["id"] for e in manifest] == ["tts", "clone", "dialogue"] and manifest == run.result["written"]
    assert [e["seed"] for e in manifest] == [0, 5, 0]
    assert manifest[0]["sampling"] == dict(SETTINGS, top_k=None)
    assert manifest[1]["references"][0]["text"] == ALICE and manifest[2]["scene"] == SCENE
    assert sorted(p.name for p in run.out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"{n}{s}" for n in written for s in (".wav", ".codes.npy")] + ["synthesize.jsonl"]
    )


def test_tts_codes_equal_the_familys_loop_on_hand_made_tokens(run, loaded):
    """The prompt tokens written out by hand (Llama-3 headers, forced-audio suffix) and generated by the
    family's own loop, without prompt_from_record or generate_codes: the written codes are those."""
    from higgs_ds.eval.generate import Prompt, _boson_codes
    from higgs_ds.models.family import NATIVE, environment_family

    model, tokenizer = loaded
    text = (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{TEXT}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    empty = np.zeros((8, 0), np.int64)
    with torch.no_grad():
        if environment_family() == NATIVE:
            from higgs_ds.models.native.generate import generate_native_codes

            expected = generate_native_codes(model, tokenizer, ids, empty, [], seed=0, synced_gpus=False, **SETTINGS)
        else:
            prompt = Prompt(None, ids, empty, [], TEXT)
            expected = _boson_codes(model, tokenizer, prompt, seed=0, synced_gpus=False, **SETTINGS)
    got = _codes(run.out, "tts")
    assert got.shape == (8, MAX)  # a random tiny model does not end its audio within 12 frames
    np.testing.assert_array_equal(got, expected)


def test_clone_prompt_tokens_by_hand(run, loaded, ref_codes):
    from higgs_ds.eval.generate import prompt_from_record

    _, tokenizer = loaded
    request = run.batch.requests[1]
    ref = ref_codes["alice_001.flac"]
    prompt = prompt_from_record(prompt_record(request, [ref], 8), tokenizer)
    text = (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{ALICE}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|><|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{TEXT}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
    )
    assert prompt.input_ids == tokenizer.encode(text, add_special_tokens=False)
    np.testing.assert_array_equal(prompt.codes, ref)
    assert prompt.frames == [ref.shape[1]] and ref.shape[1] == 59  # 2.36 s at 25 frames/s


@pytest.mark.parametrize("name", ["clone", "dialogue"])
def test_codes_equal_generate_codes_on_a_hand_made_record(run, loaded, ref_codes, name):
    from higgs_ds.eval.generate import generate_codes

    model, tokenizer = loaded
    alice = ref_codes["alice_001.flac"]
    if name == "clone":
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ALICE}, _audio_turn("a")]
        refs, seed = [alice], 5
    else:
        scene = f"{SYSTEM}\n\n<|scene_desc_start|>\n{SCENE}\n<|scene_desc_end|>"
        messages = [
            {"role": "system", "content": scene},
            {"role": "user", "content": f"[SPEAKER0] {ALICE}"},
            _audio_turn("a"),
            {"role": "user", "content": f"[SPEAKER1] {BOB}"},
            _audio_turn("b"),
        ]
        refs, seed = [alice, ref_codes["bob_002.flac"]], 0
    text = TEXT if name == "clone" else DIALOGUE
    record = _record(messages + [{"role": "user", "content": text}, _audio_turn("target")], refs)
    expected = generate_codes(model, tokenizer, record, seed=seed, synced_gpus=False, **SETTINGS)
    np.testing.assert_array_equal(_codes(run.out, name), expected)
    entry = next(e for e in run.result["written"] if e["id"] == name)
    assert [r["frames"] for r in entry["references"]] == [c.shape[1] for c in refs]


def test_the_record_is_the_one_the_shards_hold(tmp_path, tiny_model_dir, tiny_codec):
    """The demo's cloning sample clone_alice_003 as `higgs-ds shards build` stores it, and the same request
    made to synthesize: the same prompt tokens and reference codes."""
    from transformers import AutoTokenizer

    from higgs_ds.eval.generate import prompt_from_record
    from higgs_ds.shards.build import BuildConfig, build_shards
    from higgs_ds.stream.reader import load_index, read_shard

    manifest = write_manifest(tmp_path / "data", demo_lines({"clone_alice_003"}))
    shards = tmp_path / "shards"
    build_shards([str(manifest)], str(shards), tiny_codec, BuildConfig(tokenizer=str(tiny_model_dir)), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (stored,) = [r for s in load_index(shards)["shards"] for _, r in read_shard(str(shards / s["file"]))]
    assert stored["json"]["id"] == "clone_alice_003"
    messages = stored["json"]["messages"]
    ref = Reference(str(AUDIO / "alice_002.flac"), messages[1]["content"])
    request = SynthRequest("clone_alice_003", messages[3]["content"], (ref,))
    mine = prompt_from_record(prompt_record(request, [encode_reference(tiny_codec, ref.audio, 30)], 8), tokenizer)
    theirs = prompt_from_record(stored, tokenizer)
    assert mine.input_ids == theirs.input_ids
    np.testing.assert_array_equal(mine.codes, theirs.codes)


@pytest.mark.parametrize("name", ["tts", "clone", "dialogue"])
def test_wav_is_the_codecs_decode_at_its_rate(run, tiny_codec, name):
    codes = _codes(run.out, name)
    info = sf.info(str(run.out / f"{name}.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "FLOAT")
    assert tiny_codec.provenance["sample_rate"] == 24000 and tiny_codec.hop_length == 960
    wave, _ = sf.read(str(run.out / f"{name}.wav"), dtype="float32")
    assert len(wave) == codes.shape[1] * 960
    np.testing.assert_array_equal(wave, tiny_codec.decode(codes))
    entry = next(e for e in run.result["written"] if e["id"] == name)
    assert entry["frames"] == codes.shape[1] and entry["seconds"] == round(len(wave) / 24000, 3)


def test_same_seed_same_audio_other_seed_other_audio(run, tiny_model_dir, tmp_path):
    ref = Reference(str(AUDIO / "alice_001.flac"), ALICE)
    requests = [SynthRequest("same", TEXT, (ref,), seed=5), SynthRequest("other", TEXT, (ref,), seed=6)]
    synthesize(tiny_model_dir, requests, tmp_path, Sampling(max_new_frames=MAX), codec="tiny", say=lambda m: None)
    np.testing.assert_array_equal(_codes(tmp_path, "same"), _codes(run.out, "clone"))
    assert (tmp_path / "same.wav").read_bytes() == (run.out / "clone.wav").read_bytes()
    assert not np.array_equal(_codes(tmp_path, "other"), _codes(run.out, "clone"))


def test_existing_outputs_are_refused_unless_overwrite(run, tiny_model_dir, tmp_path, monkeypatch):
    import higgs_ds.eval.synthesize as synth

    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    before = (out / "tts.wav").read_bytes()
    request = [SynthRequest("tts", "Another text.", seed=1)]
    with monkeypatch.context() as m:  # a run with nothing to write loads no model
        m.setattr(synth, "load_model", lambda *a: pytest.fail("loaded a model for nothing"))
        result = synthesize(tiny_model_dir, request, out, Sampling(max_new_frames=4), codec="tiny", say=print)
    assert result["written"] == [] and "exists" in result["refused"][0].reason
    assert (out / "tts.wav").read_bytes() == before
    result = synthesize(tiny_model_dir, request, out, Sampling(max_new_frames=4), codec="tiny", overwrite=True)
    assert len(result["written"]) == 1 and (out / "tts.wav").read_bytes() != before
    manifest = [json.loads(x) for x in (out / "synthesize.jsonl").read_text().splitlines()]
    assert [(e["id"], e["seed"]) for e in manifest] == [("clone", 5), ("dialogue", 0), ("tts", 1)]


def test_cli_text_mode(tiny_model_dir, tmp_path, capsys):
    args = ["synthesize", str(tiny_model_dir), "--text", TEXT, "--out", str(tmp_path), "--codec", "tiny"]
    assert main(args + ["--max-frames", "4", "--name", "hello", "--scene", SCENE, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'hello.wav'}" in out and "1 written, 0 refused of 1" in out
    (entry,) = [json.loads(x) for x in (tmp_path / "synthesize.jsonl").read_text().splitlines()]
    assert (entry["scene"], entry["seed"], entry["frames"], entry["sampling"]["max_new_frames"]) == (SCENE, 3, 4, 4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", " "], "--text: the text is empty"),
        (["--text", "hi", "--ref-audio", "a.wav"], "1 --ref-audio and 0 --ref-text"),
        (["--text", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--text", "hi", "--device", "tpu"], "--device 'tpu'"),
        (["--text", "hi", "--name", "../up"], "id '../up' cannot name an output file"),
        (["--batch", "/nonexistent/prompts.jsonl"], "prompts file not found: /nonexistent/prompts.jsonl"),
        (["--text", "hi", "--ref-audio", "/nonexistent/me.wav", "--ref-text", "t"], "/nonexistent/me.wav"),
        (["--text", "hi", *ALICE_REF, "--max-reference-seconds", "1"], "over --max-reference-seconds 1 (cut it"),
        (["--text", "hi", "--seed", "-1"], "--seed must be an integer"),
        (["--text", "hi", "--max-seconds", "nan"], "--max-seconds must be a positive number"),
        (["--batch", "p.jsonl", "--name", "x"], "--name names the --text output"),
    ],
)
def test_cli_bad_input_is_one_line_naming_it(tiny_model_dir, tmp_path, capsys, monkeypatch, extra, message):
    import higgs_ds.eval.synthesize as synth

    monkeypatch.setattr(synth, "load_model", lambda *a: pytest.fail("loaded a model for bad input"))
    assert main(["synthesize", str(tiny_model_dir), "--out", str(tmp_path), "--codec", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("higgs-ds: error:")


def test_cli_batch_of_bad_lines_exits_2_loading_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import higgs_ds.eval.synthesize as synth

    monkeypatch.setattr(synth, "load_model", lambda *a: pytest.fail("loaded a model for bad input"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": ""}\n\n{"id": "x y", "text": "hi"}\n')
    args = ["synthesize", str(tiny_model_dir), "--batch", str(prompts), "--out", str(tmp_path / "o"), "--codec", "tiny"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert f"{prompts} line 1: refused: the text is empty" in captured.out
    assert f"{prompts} line 3: refused: id 'x y'" in captured.out
    assert "0 written, 2 refused of 2" in captured.out and "2 of 2 lines" in captured.err


def test_model_dir_with_code_is_refused(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "modeling_evil.py").write_text("raise SystemExit('ran code from a model directory')\n")
    with pytest.raises(UserError, match="carries Python files"):
        synthesize(model, [SynthRequest("x", TEXT)], tmp_path / "out", codec="tiny")


def test_codec_from_the_model_directory(tiny_model_dir, tiny_codec, tmp_path):
    from higgs_ds.models.family import environment_family
    from higgs_ds.shards.codec import TINY_CODEC_VERSIONS

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "processor_config.json").unlink(missing_ok=True)  # the native tiny model names the hub codec
    with pytest.raises(UserError, match="names no local codec.*pass --codec"):
        find_codec(model, None, "cpu")
    sha = tiny_codec.provenance["weights_sha256"]
    note = {"codec": {"codec": TINY_CODEC_VERSIONS[environment_family()], "weights_sha256": sha}}
    (model / "codec.json").write_text(json.dumps(note))  # what `higgs-ds export` writes after training on it
    codec, warning = find_codec(model, None, "cpu")
    assert codec.provenance["weights_sha256"] == sha and warning is None
    note["codec"]["weights_sha256"] = "0" * 64
    (model / "codec.json").write_text(json.dumps(note))
    with pytest.raises(UserError, match="names no local codec"):  # not the tiny codec: no guess
        find_codec(model, None, "cpu")
    _, warning = find_codec(model, "tiny", "cpu")
    assert sha in warning and "0" * 64 in warning
    ref = {"audio_tokenizer": {"audio_tokenizer_name_or_path": tiny_codec.path}}
    (model / "processor_config.json").write_text(json.dumps(ref))
    assert find_codec(model, None, "cpu")[0].path == tiny_codec.path
