"""`higgs-ds synthesize` of a Higgs TTS 3 model: a JSONL batch with plain TTS and cloning lines is written or
refused line by line (a dialogue and a scene have no v3 prompt: refused by name), and the codes are what
v3's own loop gives on the prompt built by hand from the tokenizer."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from higgs_ds.cli import main
from higgs_ds.eval.synth_request import Defaults, read_batch
from higgs_ds.eval.synthesize import Sampling, synthesize

from .conftest import DEMO

AUDIO = DEMO / "audio"
MAX = 10
TEXT = "Rice is often served in round bowls. <|emotion:elation|>"
ALICE = "The birch canoe slid on the smooth planks."  # what alice_001.flac says
BOB = "The soft cushion broke the man's fall."


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_v3, tiny_codec):
    folder = tmp_path_factory.mktemp("synth-v3")
    alice = {"audio": str(AUDIO / "alice_001.flac"), "text": ALICE}
    bob = {"audio": str(AUDIO / "bob_002.flac"), "text": BOB}
    lines = [
        {"id": "tts", "text": TEXT},
        {"id": "clone", "text": TEXT, "reference": alice, "seed": 4},
        {"id": "dialogue", "text": "[SPEAKER0] Hi. [SPEAKER1] Hello.", "references": [alice, bob]},
        {"id": "scene", "text": TEXT, "scene": "A quiet office."},
    ]
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    batch = read_batch(prompts, Defaults())
    said = []
    result = synthesize(tiny_v3, batch.requests, folder / "out", Sampling(max_new_frames=MAX), codec="tiny",
                        refused=batch.refused, say=said.append, progress=False)  # fmt: skip
    return SimpleNamespace(out=folder / "out", result=result, said=said)


def test_plain_and_cloning_lines_are_written_dialogue_and_scene_refused_by_name(run):
    written = {e["id"]: e for e in run.result["written"]}
    refused = {r.line: r.reason for r in run.result["refused"]}
    assert sorted(written) == ["clone", "tts"] and sorted(refused) == [3, 4]
    assert "single-speaker" in refused[3] and "scene description" in refused[4]
    assert all(e["family"] == "v3" and e["frames"] == MAX for e in written.values())
    for name in written:
        assert np.load(run.out / f"{name}.codes.npy").shape == (8, MAX)
        assert (run.out / f"{name}.wav").stat().st_size > 0


def test_codes_are_v3s_loop_on_the_hand_built_prompt(run, tiny_v3, tiny_codec):
    import soundfile as sf
    import soxr
    from transformers import AutoTokenizer

    from higgs_ds.models.v3.checkpoint import load_v3_model
    from higgs_ds.models.v3.delay import apply_v3_delay
    from higgs_ds.models.v3.generate import generate_v3_codes

    tok = AutoTokenizer.from_pretrained(str(tiny_v3))
    model = load_v3_model(tiny_v3).eval()
    ids = tok.convert_tokens_to_ids

    def text(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    wave, rate = sf.read(str(AUDIO / "alice_001.flac"), dtype="float32", always_2d=True)
    ref = tiny_codec.encode(soxr.resample(wave.mean(axis=1), rate, 24000, quality="HQ").astype(np.float32))
    rows = apply_v3_delay(ref)
    plain = [ids("<|tts|>"), ids("<|text|>"), *text(TEXT), ids("<|audio|>")]
    clone = [ids("<|tts|>"), ids("<|ref_text|>"), *text(ALICE), ids("<|ref_audio|>"), *[-100] * len(rows),
             ids("<|text|>"), *text(TEXT), ids("<|audio|>")]  # fmt: skip
    settings = dict(pad_id=tok.pad_token_id, max_new_frames=MAX, temperature=0.7, top_k=None, top_p=0.95)
    with torch.no_grad():
        want_tts = generate_v3_codes(model, plain, None, seed=0, **settings)
        want_clone = generate_v3_codes(model, clone, rows, seed=4, **settings)
    np.testing.assert_array_equal(np.load(run.out / "tts.codes.npy"), want_tts)
    np.testing.assert_array_equal(np.load(run.out / "clone.codes.npy"), want_clone)
    assert not np.array_equal(want_tts, want_clone)


def test_cli_text_mode(tiny_v3, tmp_path, capsys):
    args = ["synthesize", str(tiny_v3), "--text", "Hello.", "--out", str(tmp_path), "--codec", "tiny"]
    assert main(args + ["--max-frames", "4", "--name", "hello"]) == 0
    assert f"wrote {tmp_path / 'hello.wav'}" in capsys.readouterr().out
