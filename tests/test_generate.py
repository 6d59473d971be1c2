"""higgs_ds.eval.generate on the tiny real model, the tiny codec and the small shards of this environment's
family: prompts as boson's serve engine builds them (force_audio_gen), the family's own generation loop
(boson's HiggsAudioModel.generate, or transformers' generate() for the native model), codes -> codec waveform.
Tests without a marker run in both environments; the native loop's own tests (and its equality with boson's
greedy codes) are in tests/test_native_generate.py."""

import numpy as np
import pytest
import torch

from higgs_ds.eval.generate import (
    AUDIO_GEN_POSTFIX,
    codes_from_generated,
    generate_audio,
    generate_codes,
    prepare_inputs,
    prompt_from_record,
)

MAX_FRAMES = 20


def _load_model(model_dir):
    from higgs_ds.models.family import NATIVE, environment_family

    if environment_family() == NATIVE:
        from higgs_ds.models.native.load import load_native_model

        return load_native_model(model_dir)
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    return HiggsAudioModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, small_shards):
    from transformers import AutoTokenizer

    from higgs_ds.stream.reader import load_index, read_shard

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _load_model(tiny_model_dir)
    records = {}
    for shard in load_index(small_shards)["shards"]:
        for _, record in read_shard(str(small_shards / shard["file"])):
            records[record["json"]["id"]] = record
    return model, tokenizer, records


def _clone_id(records):
    return next(i for i in sorted(records) if i.startswith("clone_"))


def _tts_id(records):
    return next(i for i in sorted(records) if not i.startswith("clone_"))


def _postfix(tokenizer):
    return tokenizer.encode(AUDIO_GEN_POSTFIX, add_special_tokens=False)


@pytest.mark.boson_env
def test_tts_prompt_is_system_and_user_then_forced_audio(setup):
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    model, tokenizer, records = setup
    record = records[_tts_id(records)]
    messages = record["json"]["messages"]
    prompt = prompt_from_record(record, tokenizer)
    expected, _, _, _ = prepare_chatml_sample({"messages": messages[:2]}, tokenizer)
    assert prompt.input_ids == expected + _postfix(tokenizer)
    assert prompt.frames == [] and prompt.codes.shape == (8, 0)
    assert prompt.text == messages[1]["content"]
    inputs = prepare_inputs(prompt, model.config)
    ids = inputs["input_ids"][0].tolist()
    assert ids == prompt.input_ids  # round_to=1: nothing after <|audio_out_bos|>
    assert ids[-1] == model.config.audio_out_bos_token_id
    tail = ids[-len(_postfix(tokenizer)) :]
    assert tokenizer.decode(tail) == "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
    assert model.config.audio_out_token_idx not in ids and model.config.audio_in_token_idx not in ids


def test_clone_prompt_carries_the_reference_codes(setup):
    _, tokenizer, records = setup
    record = records[_clone_id(records)]
    meta = record["json"]
    ref_frames = meta["audio"][0]["frames"]
    prompt = prompt_from_record(record, tokenizer)
    assert prompt.frames == [ref_frames]
    np.testing.assert_array_equal(prompt.codes, record["codes"][:, :ref_frames])
    assert prompt.text == meta["messages"][3]["content"]  # the target's text, not the reference's
    assert prompt.input_ids[-len(_postfix(tokenizer)) :] == _postfix(tokenizer)
    assert prompt.input_ids.count(tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>")) == 1  # the reference's turn


@pytest.mark.boson_env
def test_clone_prompt_boson_inputs_frame_the_reference(setup):
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    model, tokenizer, records = setup
    record = records[_clone_id(records)]
    ref_frames = record["json"]["audio"][0]["frames"]
    prompt = prompt_from_record(record, tokenizer)
    inputs = prepare_inputs(prompt, model.config)
    ids = inputs["input_ids"][0].tolist()
    assert ids[-len(_postfix(tokenizer)) :] == _postfix(tokenizer)
    assert ids.count(model.config.audio_out_token_idx) == 1  # the reference's assistant audio turn
    assert inputs["audio_out_ids_start"].tolist() == [0]
    # the collator framed the codes as [BOS | codes | EOS] with the delay pattern, as in training
    framed = revert_delay_pattern(inputs["audio_out_ids"])
    assert (framed[:, 0] == model.config.audio_stream_bos_id).all()
    assert (framed[:, -1] == model.config.audio_stream_eos_id).all()
    np.testing.assert_array_equal(framed[:, 1:-1].numpy(), record["codes"][:, :ref_frames])


@pytest.mark.parametrize("kind", ["tts", "clone"])
def test_generate_audio_waveform_and_codes(setup, tiny_codec, kind):
    model, tokenizer, records = setup
    record = records[_tts_id(records) if kind == "tts" else _clone_id(records)]
    model.train()
    wave, codes = generate_audio(model, tokenizer, tiny_codec, record, max_new_frames=MAX_FRAMES, seed=0)
    assert model.training and all(m.training for m in model.modules())  # train state restored
    frames = codes.shape[1]
    assert codes.shape[0] == 8 and 0 < frames <= MAX_FRAMES
    assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < tiny_codec.provenance["codebook_size"]
    assert tiny_codec.provenance["codebook_size"] == 1024  # the code vocabulary, without the stream BOS/EOS ids
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
    assert len(wave) == frames * tiny_codec.hop_length  # the codec decodes exactly one hop per frame
    assert tiny_codec.provenance["sample_rate"] == 24000


def test_same_seed_same_codes_other_seed_other_codes(setup):
    model, tokenizer, records = setup
    record = records[_clone_id(records)]
    first = generate_codes(model, tokenizer, record, max_new_frames=MAX_FRAMES, seed=0)
    again = generate_codes(model, tokenizer, record, max_new_frames=MAX_FRAMES, seed=0)
    other = generate_codes(model, tokenizer, record, max_new_frames=MAX_FRAMES, seed=1)
    np.testing.assert_array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_greedy_output_depends_on_the_prompt(setup):
    """Temperature 0 (argmax): the reference codes and the text reach the model's logits."""
    model, tokenizer, records = setup
    tts = generate_codes(model, tokenizer, records[_tts_id(records)], max_new_frames=8, temperature=0)
    clone = generate_codes(model, tokenizer, records[_clone_id(records)], max_new_frames=8, temperature=0)
    assert tts.shape[1] > 0 and clone.shape[1] > 0
    assert tts.shape != clone.shape or not np.array_equal(tts, clone)


@pytest.mark.boson_env
def test_synced_gpus_reaches_boson_sample_loop(setup, monkeypatch):
    """ZeRO-3 needs synced_gpus in boson's _sample (without a process group it is recorded, then run
    off) and no inference mode (ZeRO-3's gathered parameters would become inference tensors)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    model, tokenizer, records = setup
    seen = []
    original = HiggsAudioModel._sample

    def spy(self, *args, synced_gpus, **kwargs):
        seen.append(synced_gpus)
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        return original(self, *args, synced_gpus=False, **kwargs)

    monkeypatch.setattr(HiggsAudioModel, "_sample", spy)
    record = records[_tts_id(records)]
    generate_codes(model, tokenizer, record, max_new_frames=2, synced_gpus=True)
    generate_codes(model, tokenizer, record, max_new_frames=2)  # default: transformers decides (no ZeRO-3 here)
    assert seen == [True, False]


@pytest.mark.boson_env
def test_codes_from_generated_strips_bos_and_eos(setup):
    """A delayed stream built by boson's own delay function: the frames come back exactly, whether the
    stream ended with EOS or was cut by max_new_frames; a sampled BOS id mid-stream is clipped."""
    from boson_multimodal.model.higgs_audio.utils import build_delay_pattern_mask

    config = setup[0].config
    bos, eos = config.audio_stream_bos_id, config.audio_stream_eos_id
    codes = torch.randint(0, 1024, (8, 5), generator=torch.Generator().manual_seed(0))
    framed = torch.cat([torch.full((8, 1), bos), codes, torch.full((8, 1), eos)], dim=1)
    delayed, _ = build_delay_pattern_mask(framed[None], bos_token_id=bos, pad_token_id=eos)
    delayed = delayed[0]  # (8, 5 + 2 + 7): what _sample returns for an audio that ended by itself
    np.testing.assert_array_equal(codes_from_generated(delayed, config), codes.numpy())
    cut = delayed[:, : 1 + 5 + 7]  # stopped at max length: the BOS column, 5 frames, the delay tail
    np.testing.assert_array_equal(codes_from_generated(cut, config), codes.numpy())
    cut = cut.clone()
    cut[0, 3] = bos
    assert codes_from_generated(cut, config)[0, 2] == config.audio_codebook_size - 1
