"""The issue's check 1 for generation, and the native generation path itself.

Boson's environment (tests/reference/boson_generate.py) builds the tiny boson model, reshapes a few of its
weights so that greedy codes vary, depend on the prompt and end at different points (see that script), and
greedy-generates five prompts with boson's own HiggsAudioModel.generate, repetition-aware sampling off: plain
TTS (twice), voice cloning with a reference audio in the prompt, a text-only conversation history, and audio
in a user turn. Here the same weights converted to the native format (higgs_ds.models.convert) generate the
same prompts with transformers' own generate(): the codes must be identical (exact equality; the prompt token
ids too). Then, on the same converted model: sampling with a seed is repeatable, the layout of a prompt and the
undoing of the delay pattern against transformers' own delay function, PEFT wrapping, repetition-aware
sampling and synced_gpus reaching transformers' loop.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from higgs_ds.models.family import BOSON
from tests.envs import REFERENCE, run_in_env

pytestmark = pytest.mark.native_env

MAX_FRAMES = 30
K = 8
SYSTEM = {"role": "system", "content": "Generate audio following instruction."}
AUDIO = {"type": "audio", "audio_url": "audio/x.wav"}


def _record(sample_id, messages, frames, rng):
    """A shard record: its json and the codes of its audio items (the last is the target's) in order."""
    codes = rng.integers(0, 1024, (K, sum(frames)))
    return {"json": {"id": sample_id, "messages": messages, "audio": [{"frames": f} for f in frames]}, "codes": codes}


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    target = {"role": "assistant", "content": AUDIO}
    return [
        _record("tts", [SYSTEM, user("The birch canoe slid on the smooth planks."), target], [30], rng),
        _record("tts2", [SYSTEM, user("Glue the sheet to the dark blue background."), target], [30], rng),
        _record(
            "clone",
            [SYSTEM, user("It is easy to tell the depth of a well."), target, user("A leg is a rare dish."), target],
            [12, 30],
            rng,
        ),
        _record(
            "history",
            [
                SYSTEM,
                user("Hello there."),
                {"role": "assistant", "content": "Hi! What shall I read?"},
                user("Rice is often served in round bowls."),
                target,
            ],
            [30],
            rng,
        ),
        _record("audio_in", [SYSTEM, user([{"type": "text", "text": "Say it so:"}, AUDIO]), target], [9, 30], rng),
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("boson-generate")
    records = _records()
    spec = {
        "max_new_frames": MAX_FRAMES,
        "records": [{"json": r["json"], "codes": r["codes"].tolist()} for r in records],
    }
    (work / "prompts.json").write_text(json.dumps(spec))
    run_in_env(BOSON, [REFERENCE / "boson_generate.py", work / "prompts.json", work], timeout=300)
    arrays = np.load(work / "reference.npz")
    return work, records, {k: arrays[k] for k in arrays.files}, json.loads((work / "reference.json").read_text())


@pytest.fixture(scope="module")
def native(reference, tmp_path_factory):
    """The boson reference model converted to native, loaded strictly, with its tokenizer."""
    from transformers import AutoTokenizer

    from higgs_ds.models.convert import convert_model
    from higgs_ds.models.native.load import load_native_model

    torch.set_num_threads(1)
    out = convert_model(reference[0] / "boson_model", "native", tmp_path_factory.mktemp("native") / "model")
    return load_native_model(out).eval(), AutoTokenizer.from_pretrained(out)


def _greedy(model, tokenizer, record, **kwargs):
    from higgs_ds.eval.generate import generate_codes

    kwargs = {"max_new_frames": MAX_FRAMES, "temperature": 0, "ras_win_len": None, **kwargs}
    return generate_codes(model, tokenizer, record, **kwargs)


@pytest.mark.timeout(300)
def test_boson_reference_is_not_trivial(reference):
    """The reference would prove little if every prompt gave the same codes or one code repeated: prompts give
    different codes, some end by themselves (EOS) before MAX_FRAMES and some are cut there, and codebook 0
    is not one repeated code."""
    _, records, codes, _ = reference
    lengths = {r["json"]["id"]: codes[r["json"]["id"]].shape[1] for r in records}
    assert any(t < MAX_FRAMES for t in lengths.values()) and any(t == MAX_FRAMES for t in lengths.values()), lengths
    assert len(set(lengths.values())) >= 3, lengths
    assert min(lengths.values()) >= 4, lengths
    heads = {tuple(c[:, :4].ravel().tolist()) for c in codes.values()}
    assert len(heads) == len(codes)  # every prompt starts its audio differently
    for sample_id, c in codes.items():
        assert c.shape[0] == K and c.min() >= 0 and c.max() < 1024
        assert len(set(c[0].tolist())) >= c.shape[1] // 2, (sample_id, c[0])


@pytest.mark.timeout(300)
def test_prompt_ids_equal_boson_prepare_chatml_sample(reference, native):
    from higgs_ds.eval.generate import prompt_from_record

    _, records, _, meta = reference
    tokenizer = native[1]
    for record in records:
        assert prompt_from_record(record, tokenizer).input_ids == meta["prompt_ids"][record["json"]["id"]]


@pytest.mark.timeout(300)
def test_greedy_codes_equal_boson_on_converted_weights(reference, native):
    """Exact equality of every code of every prompt (shape included: the same EOS frame or the same cut)."""
    _, records, codes, _ = reference
    model, tokenizer = native
    for record in records:
        sample_id = record["json"]["id"]
        ours = _greedy(model, tokenizer, record)
        assert ours.dtype == np.int64
        assert ours.shape == codes[sample_id].shape, sample_id
        np.testing.assert_array_equal(ours, codes[sample_id], err_msg=sample_id)


@pytest.mark.timeout(300)
def test_sampling_with_a_seed_is_repeatable(reference, native):
    """Same seed, same codes; another seed, other codes; the caller's torch RNG is left as it was."""
    from higgs_ds.eval.generate import generate_codes

    records = {r["json"]["id"]: r for r in reference[1]}
    model, tokenizer = native
    state = torch.get_rng_state()
    runs = [generate_codes(model, tokenizer, records["clone"], max_new_frames=12, seed=s) for s in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert runs[0].shape != runs[2].shape or not np.array_equal(runs[0], runs[2])
    greedy = _greedy(model, tokenizer, records["clone"], max_new_frames=12)
    assert runs[0].shape != greedy.shape or not np.array_equal(runs[0], greedy)  # it did sample


@pytest.mark.timeout(300)
def test_repetition_aware_sampling_reaches_the_loop(reference, native):
    """Greedy with RAS on (window 7, at most 2 repeats, the release's) resamples the codes greedy repeats: the
    clone prompt's greedy codebook 0 repeats codes within 7 frames, so its codes change."""
    _, records, codes, _ = reference
    record = next(r for r in records if r["json"]["id"] == "clone")
    head = codes["clone"][0, :7].tolist()
    assert len(set(head)) < len(head)  # the premise: a repeat inside the first window
    model, tokenizer = native
    with_ras = _greedy(model, tokenizer, record, ras_win_len=7, ras_win_max_num_repeat=2)
    assert with_ras.shape != codes["clone"].shape or not np.array_equal(with_ras, codes["clone"])


def _processor_delay(framed: torch.Tensor) -> torch.Tensor:
    """transformers' own delay pattern (HiggsAudioV2Processor.build_delay_pattern, which needs only the
    stream ids): (K, T + 2) framed codes -> (K, T + 2 + K - 1)."""
    from transformers import HiggsAudioV2Processor

    ids = SimpleNamespace(audio_stream_bos_id=1024, audio_stream_eos_id=1025)
    return HiggsAudioV2Processor.build_delay_pattern(ids, framed[None])[0]


def _framed(codes: np.ndarray) -> torch.Tensor:
    codes = torch.as_tensor(codes, dtype=torch.long)
    return torch.cat([torch.full((K, 1), 1024), codes, torch.full((K, 1), 1025)], dim=1)


@pytest.mark.timeout(300)
def test_prompt_layout_is_the_processors(reference, native):
    """A cloning prompt: the reference item becomes (T + 2) audio tokens and K - 1 delay tokens in place of its
    one placeholder, its codes framed and delayed as transformers' processor does; the prompt ends with
    <|audio_out_bos|>; a text-only prompt has no audio inputs."""
    from higgs_ds.eval.generate import prompt_from_record
    from higgs_ds.models.native.generate import prompt_inputs

    records = {r["json"]["id"]: r for r in reference[1]}
    model, tokenizer = native
    config = model.config
    prompt = prompt_from_record(records["clone"], tokenizer)
    inputs = prompt_inputs(config, tokenizer, prompt.input_ids, prompt.codes, prompt.frames)
    ids = inputs["input_ids"][0].tolist()
    t = prompt.frames[0]
    at = prompt.input_ids.index(tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>"))
    expanded = [config.audio_token_id] * (t + 2) + [config.audio_delay_token_id] * (K - 1)
    assert ids == prompt.input_ids[:at] + expanded + prompt.input_ids[at + 1 :]
    assert ids[-1] == config.audio_bos_token_id == tokenizer.convert_tokens_to_ids("<|audio_out_bos|>")
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]
    delayed = _processor_delay(_framed(records["clone"]["codes"][:, :t]))
    torch.testing.assert_close(inputs["audio_input_ids"][0], delayed.T, rtol=0, atol=0)
    assert inputs["audio_input_ids_mask"].all() and inputs["audio_input_ids_mask"].shape == (1, t + K + 1)

    history = prompt_from_record(records["history"], tokenizer)
    inputs = prompt_inputs(config, tokenizer, history.input_ids, history.codes, history.frames)
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"][0].tolist() == history.input_ids


def test_codes_from_audio_ids_undoes_transformers_delay():
    """Columns built by transformers' own delay function come back as the frames, whether the stream ended
    with EOS or was cut by max_new_frames; a stream BOS sampled mid-stream is clipped to the last code."""
    from higgs_ds.models.native.generate import codes_from_audio_ids

    config = SimpleNamespace(audio_stream_bos_id=1024, audio_stream_eos_id=1025)
    codes = torch.randint(0, 1024, (K, 5), generator=torch.Generator().manual_seed(0))
    delayed = _processor_delay(_framed(codes)).T  # (5 + 2 + 7, K): what the loop appends for an ended audio
    np.testing.assert_array_equal(codes_from_audio_ids(delayed, config), codes.numpy())
    ended_late = torch.cat([delayed, torch.full((1, K), 1025)])  # the loop's extra all-EOS column
    np.testing.assert_array_equal(codes_from_audio_ids(ended_late, config), codes.numpy())
    cut = delayed[: 1 + 5 + 7].clone()  # stopped at max length: the BOS column, 5 frames, the delay tail
    np.testing.assert_array_equal(codes_from_audio_ids(cut, config), codes.numpy())
    cut[3, 0] = 1024
    assert codes_from_audio_ids(cut, config)[0, 2] == 1023
    assert codes_from_audio_ids(delayed[: K - 1], config).shape == (K, 0)


@pytest.mark.timeout(300)
def test_generation_runs_through_a_peft_model(reference, native):
    """LoRA-wrapped: with LoRA's zero init the codes are the base model's; with non-zero adapter weights they
    change (generation ran the adapted layers); the wrapper's train flags come back."""
    import copy

    from peft import LoraConfig, get_peft_model

    records = {r["json"]["id"]: r for r in reference[1]}
    model, tokenizer = native
    base = _greedy(model, tokenizer, records["tts"], max_new_frames=10)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), lora)  # a copy: the module's model stays plain
    peft_model.train()
    np.testing.assert_array_equal(_greedy(peft_model, tokenizer, records["tts"], max_new_frames=10), base)
    assert all(m.training for m in peft_model.modules())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=generator)
    adapted = _greedy(peft_model, tokenizer, records["tts"], max_new_frames=10)
    assert adapted.shape != base.shape or not np.array_equal(adapted, base)


@pytest.mark.timeout(300)
def test_synced_gpus_reaches_transformers_loop(reference, native, monkeypatch):
    """ZeRO-3 needs synced_gpus in the loop (without a process group it is recorded, then run off) and no
    inference mode; the default lets transformers decide (no ZeRO-3 here: off)."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    records = {r["json"]["id"]: r for r in reference[1]}
    model, tokenizer = native
    seen = []
    original = HiggsAudioV2ForConditionalGeneration._sample

    def spy(self, *args, synced_gpus=False, **kwargs):
        seen.append(synced_gpus)
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        return original(self, *args, synced_gpus=False, **kwargs)

    monkeypatch.setattr(HiggsAudioV2ForConditionalGeneration, "_sample", spy)
    _greedy(model, tokenizer, records["tts"], max_new_frames=2, synced_gpus=True)
    _greedy(model, tokenizer, records["tts"], max_new_frames=2)
    assert seen == [True, False]
