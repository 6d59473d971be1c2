"""The native family's model side on its own: the batch layout and labels (against hand-written arrays and
a literal per-token construction of the definition), the logits for the loss (against the model's own
forward, and through PEFT LoRA), strict loading, and the tiny directory as plain transformers reads it.
boson's own code is compared in tests/test_native_equivalence.py."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from higgs_ds.errors import UserError
from higgs_ds.stream.tokens import EncodedSample

pytestmark = pytest.mark.native_env

B, E, X = 1024, 1025, -100  # stream BOS / EOS codes, ignored label


@pytest.fixture(scope="module")
def tokenizer():
    from higgs_ds.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def ids(tokenizer):
    names = {"A": "<|AUDIO|>", "AO": "<|AUDIO_OUT|>", "D": "<|reserved_special_token_6|>", "P": "<|end_of_text|>",
             "BOT": "<|begin_of_text|>", "OB": "<|audio_out_bos|>", "AE": "<|audio_eos|>",
             "EOT": "<|eot_id|>"}  # fmt: skip
    return {k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from higgs_ds.models.native.tiny import write_tiny_native_model

    return write_tiny_native_model(tmp_path_factory.mktemp("tiny-native"), codec=None)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from higgs_ds.models.native.load import load_native_model

    return load_native_model(tiny_dir).eval()


def _collator(model_config, tokenizer, num_codebooks=None):
    from higgs_ds.models.native.batch import NativeCollator

    config = copy.deepcopy(model_config)
    if num_codebooks is not None:
        config.num_codebooks = num_codebooks
    return NativeCollator(config, tokenizer)


def _sample(name, input_ids, label_ids, frames, codes):
    return EncodedSample(name, np.array(input_ids), np.array(label_ids), np.array(codes, np.int64), frames)


# --- the layout, written out by hand for 2 codebooks -------------------------------------------------------


def test_layout_and_labels_by_hand(model, tokenizer, ids):
    """TTS (one trained audio-out item of 2 frames) + a sample with an audio-in item, an untrained audio-out
    item (a cloning reference) and a trained one; 2 codebooks so every array fits on a line."""
    AO, A, D, P, OB, AE, EOT = (ids[k] for k in ("AO", "A", "D", "P", "OB", "AE", "EOT"))
    tts = _sample("tts", [256, 10, OB, AO, AE, EOT], [X, X, OB, AO, AE, EOT], [2], [[1, 2], [3, 4]])
    clone = _sample(
        "clone",
        [256, 11, A, 12, OB, AO, AE, OB, AO, AE, EOT],
        [X, X, X, X, X, X, X, OB, AO, AE, EOT],
        [1, 1, 3],
        [[5, 7, 9, 10, 11], [6, 8, 12, 13, 14]],
    )
    batch = _collator(model.config, tokenizer, num_codebooks=2)([tts, clone])
    # each item of T frames: (T + 2) audio tokens and K - 1 = 1 delay token; width 22 rounded up to 24
    expected_ids = [
        [256, 10, OB, AO, AO, AO, AO, D, AE, EOT] + [P] * 14,
        [256, 11, AO, AO, AO, D, 12, OB, AO, AO, AO, D, AE, OB, AO, AO, AO, AO, AO, D, AE, EOT, P, P],
    ]
    expected_labels = [
        [X, X, OB, X, X, X, X, X, AE, EOT] + [X] * 14,
        [X] * 13 + [OB] + [X] * 6 + [AE, EOT, X, X],
    ]
    out_mask = [[0, 0, 0, 1, 1, 1, 1, 1] + [0] * 16, [0] * 8 + [1] * 4 + [0] * 2 + [1] * 6 + [0] * 4]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["label_ids"].tolist() == expected_labels
    assert batch["labels"] is batch["label_ids"]
    assert batch["attention_mask"].tolist() == [[1] * 10 + [0] * 14, [1] * 22 + [0] * 2]
    assert batch["audio_out_mask"].int().tolist() == out_mask  # the audio-in item is not an audio-out position
    # frames (rows) of each item's [BOS, codes, EOS] segment, codebook 1 delayed by one frame
    tts_frames = [[B, B], [1, B], [2, 3], [E, 4], [E, E]]
    clone_frames = (
        [[B, B], [5, B], [E, 6], [E, E]]  # audio-in
        + [[B, B], [7, B], [E, 8], [E, E]]  # untrained audio-out
        + [[B, B], [9, B], [10, 12], [11, 13], [E, 14], [E, E]]  # trained audio-out
    )
    assert batch["audio_input_ids"].tolist() == [tts_frames + [[E, E]] * 9, clone_frames]
    assert batch["audio_input_ids_mask"].int().tolist() == [[1] * 5 + [0] * 9, [1] * 14]
    # labels of the audio-out segments only: [-100, codes, EOS] delayed; the untrained one all -100
    assert batch["label_audio_ids"].tolist() == [
        [X, 1, 2, E, X] + [X] * 4 + [X, 9, 10, 11, E, X],
        [X, X, 3, 4, E] + [X] * 4 + [X, X, 12, 13, 14, E],
    ]
    assert batch["sample_ids"] == ["tts", "clone"]
    assert {k: v.dtype for k, v in batch.items() if k != "sample_ids"} == {
        "input_ids": torch.int64, "attention_mask": torch.int64, "label_ids": torch.int64, "labels": torch.int64,
        "audio_out_mask": torch.bool, "audio_input_ids": torch.int64, "audio_input_ids_mask": torch.bool,
        "label_audio_ids": torch.int64,
    }  # fmt: skip


# --- the layout for 8 codebooks, against a literal construction of the definition ---------------------------


def _literal_segment(codes: np.ndarray, trained: bool):
    """One item's (ids, labels), each (K, T + K + 1): cell (k, c) holds entry c - k of the framed row
    [BOS, codes_k, EOS] (labels [-100, codes_k, EOS], all -100 when untrained); BOS before it, EOS after
    (-100 for labels)."""
    k_count, t = codes.shape
    ids, labels = [], []
    for k in range(k_count):
        framed = [B, *codes[k].tolist(), E]
        target = [X, *codes[k].tolist(), E] if trained else [X] * (t + 2)
        ids.append([B if c - k < 0 else E if c - k >= t + 2 else framed[c - k] for c in range(t + k_count + 1)])
        labels.append([target[c - k] if 0 <= c - k < t + 2 else X for c in range(t + k_count + 1)])
    return ids, labels


def _literal_batch(samples, config, ids):
    k_count = config.num_codebooks
    rows, label_rows, out_rows, frames_rows, label_cols = [], [], [], [], []
    for s in samples:
        row, labels, out, frames, item, start = [], [], [], [], 0, 0
        for token, label in zip(s.input_ids.tolist(), s.label_ids.tolist()):
            if token not in (ids["A"], ids["AO"]):
                row, labels, out = row + [token], labels + [label], out + [False]
                continue
            t = s.frames[item]
            seg, seg_labels = _literal_segment(s.codes[:, start : start + t], token == ids["AO"] and label >= 0)
            row += [ids["AO"]] * (t + 2) + [ids["D"]] * (k_count - 1)
            labels += [X] * (t + k_count + 1)
            out += [token == ids["AO"]] * (t + k_count + 1)
            frames += [list(col) for col in zip(*seg)]
            if token == ids["AO"]:
                label_cols += [list(col) for col in zip(*seg_labels)]
            item, start = item + 1, start + t
        rows.append(row)
        label_rows.append(labels)
        out_rows.append(out)
        frames_rows.append(frames)
    width = -(-max(map(len, rows)) // 8) * 8
    f_width = max(map(len, frames_rows))
    return {
        "input_ids": [r + [ids["P"]] * (width - len(r)) for r in rows],
        "label_ids": [r + [X] * (width - len(r)) for r in label_rows],
        "audio_out_mask": [r + [False] * (width - len(r)) for r in out_rows],
        "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in rows],
        "audio_input_ids": [f + [[E] * k_count] * (f_width - len(f)) for f in frames_rows],
        "audio_input_ids_mask": [[True] * len(f) + [False] * (f_width - len(f)) for f in frames_rows],
        "label_audio_ids": [list(r) for r in zip(*label_cols)],
    }


def _random_samples(ids, rng, count):
    """Samples of random text with audio-in, trained and untrained audio-out items in random places."""
    samples = []
    for n in range(count):
        tokens, labels, frames = [ids["BOT"]], [X], []
        for _ in range(rng.integers(0, 4)):
            text = rng.integers(0, 256, rng.integers(1, 9)).tolist()
            kind = rng.choice(["in", "out", "untrained"])
            tokens += text + [ids["A"] if kind == "in" else ids["AO"]]
            labels += [t if rng.random() < 0.5 else X for t in text] + [ids["AO"] if kind == "out" else X]
            frames.append(int(rng.integers(1, 7)))
        tokens, labels = tokens + [ids["EOT"]], labels + [ids["EOT"]]
        codes = rng.integers(0, 1024, (8, sum(frames)))
        samples.append(_sample(f"random_{n}", tokens, labels, frames, codes))
    return samples


def test_layout_of_random_batches_equals_the_definition(model, tokenizer, ids):
    rng = np.random.default_rng(0)
    collator = _collator(model.config, tokenizer)
    for size in (1, 2, 3, 5):
        samples = _random_samples(ids, rng, size)
        batch = collator(samples)
        expected = _literal_batch(samples, model.config, ids)
        for key, value in expected.items():
            assert batch[key].tolist() == value, (key, size)
        placeholders = sum(len(s.frames) for s in samples)
        assert int((batch["input_ids"] == ids["D"]).sum()) == 7 * placeholders  # K - 1 delay tokens per item
        assert batch["input_ids"].shape[1] % 8 == 0
        assert int(batch["audio_out_mask"].sum()) == batch["label_audio_ids"].shape[1]
        # the model's own placeholder rule sees exactly the frames the mask provides, row by row
        routed = (batch["input_ids"] == ids["AO"]) | (batch["input_ids"] == ids["D"])
        assert routed.sum(1).tolist() == batch["audio_input_ids_mask"].sum(1).tolist()


def test_text_only_batch(model, tokenizer, ids):
    from higgs_ds.models.native.logits import native_logits
    from higgs_ds.train.loss import higgs_loss

    s = _sample("text", [ids["BOT"], 40, 41, 42, ids["EOT"]], [X, X, 41, 42, ids["EOT"]], [], np.zeros((8, 0)))
    batch = _collator(model.config, tokenizer)([s])
    assert tuple(batch["audio_input_ids"].shape) == (1, 0, 8) and tuple(batch["label_audio_ids"].shape) == (0, 0)
    text, audio = native_logits(model, batch)
    assert tuple(audio.shape) == (0, 8, 1026)
    loss, _ = higgs_loss(text, batch["label_ids"], audio, batch["label_audio_ids"])
    assert torch.isfinite(loss)


def test_bad_samples_are_named(model, tokenizer, ids):
    collator = _collator(model.config, tokenizer)
    two_items = _sample("two", [1, ids["AO"], 2], [X, ids["AO"], X], [3, 4], np.zeros((8, 7)))
    with pytest.raises(ValueError, match="'two': 1 audio placeholders in its tokens, 2 audio items"):
        collator([two_items])
    short = _sample("short", [1, ids["AO"], 2], [X, X, X], [3], np.zeros((8, 2)))
    with pytest.raises(ValueError, match="'short': codes of shape"):
        collator([short])
    other = copy.deepcopy(model.config)
    other.audio_token_id = ids["A"]
    with pytest.raises(UserError, match="audio_token_id"):
        _collator(other, tokenizer)


# --- logits for the loss -------------------------------------------------------------------------------------


def _batch(model, tokenizer, ids, count=3, seed=1):
    return _collator(model.config, tokenizer)(_random_samples(ids, np.random.default_rng(seed), count))


def test_logits_equal_the_models_own_forward(model, tokenizer, ids):
    """Our logits against the model's own forward: its audio head on every position (picked at the audio-out
    positions), the text head on its last hidden state."""
    from higgs_ds.models.native.logits import NATIVE_MODEL_INPUTS, native_logits

    batch = _batch(model, tokenizer, ids)
    assert batch["label_audio_ids"].shape[1] > 0
    inputs = {k: batch[k] for k in NATIVE_MODEL_INPUTS}
    with torch.no_grad():
        text, audio = native_logits(model, batch)
        full = model(**inputs, use_cache=False).logits  # (B, S, K * 1026)
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
    # the head on the audio-out rows only is another GEMM shape than on every row: BLAS may block it
    # differently and change the last bit (measured 1.8e-7 on logits up to 0.73 on one CPU, 0 on another)
    want = full[batch["audio_out_mask"]].view(-1, 8, 1026).float()
    torch.testing.assert_close(audio, want, atol=1e-6, rtol=0)
    assert torch.equal(text, model.text_lm_head(hidden))
    assert tuple(text.shape) == (*batch["input_ids"].shape, 288)


def test_logits_through_peft_lora(model, tokenizer, ids):
    """LoRA adapters on attention, the dual FFN and both heads act through native_logits, and gradients
    reach them."""
    from peft import LoraConfig, get_peft_model

    from higgs_ds.models.native.logits import native_logits

    batch = _batch(model, tokenizer, ids, seed=2)
    with torch.no_grad():
        base_text, base_audio = native_logits(model, batch)
    targets = ["q_proj", "gate_proj", "audio_lm_head", "text_lm_head"]  # gate_proj: mlp and audio_mlp
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        text, audio = native_logits(peft_model, batch)  # lora_B starts at zero
    assert torch.equal(text, base_text) and torch.equal(audio, base_audio)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    text, audio = native_logits(peft_model, batch)
    (text.float().mean() + audio.mean()).backward()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    with torch.no_grad():
        merged_text, merged_audio = native_logits(merged, batch)
    assert (text - base_text).abs().max() > 1e-3 and (audio - base_audio).abs().max() > 1e-3
    torch.testing.assert_close(text, merged_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(audio, merged_audio, atol=1e-5, rtol=0)
    for module in ("q_proj", "audio_mlp.gate_proj", ".mlp.gate_proj", "audio_lm_head", "text_lm_head"):
        grads = [p.grad for n, p in peft_model.named_parameters() if module in n and "lora_A" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), module


# --- strict loading ------------------------------------------------------------------------------------------


def _edited_copy(tiny_dir, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "edited"
    shutil.copytree(tiny_dir, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t.pop("model.layers.1.audio_mlp.up_proj.weight"), "missing model.layers.1.audio_mlp.up_proj.weight"),
        (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), "unexpected model.extra.weight"),
        (lambda t: t.pop("text_lm_head.weight"), "no text_lm_head.weight"),
        (lambda t: t.update({"model.norm.weight": torch.ones(3)}), "shape of model.norm.weight is [3]"),
    ],
    ids=["missing", "unexpected", "no-text-head", "shape"],
)
def test_strict_loading_names_the_key(tiny_dir, tmp_path, edit, named):
    from higgs_ds.models.native.load import load_native_model

    bad = _edited_copy(tiny_dir, tmp_path, edit)
    with pytest.raises(UserError, match=named.replace("[", r"\[").replace("]", r"\]")) as err:
        load_native_model(bad)
    assert str(bad) in str(err.value)


def test_a_boson_directory_is_refused_with_what_to_do(tiny_dir, tmp_path):
    from higgs_ds.models.native.load import load_native_model

    boson = tmp_path / "boson"
    shutil.copytree(tiny_dir, boson)
    config = json.loads((boson / "config.json").read_text())
    (boson / "config.json").write_text(json.dumps(dict(config, model_type="higgs_audio")))
    with pytest.raises(UserError, match="higgs-ds convert"):
        load_native_model(boson)


# --- the tiny directory as plain transformers reads it -------------------------------------------------------


def test_tiny_directory_loads_with_plain_transformers(tiny_dir):
    from safetensors.torch import load_file
    from transformers import GenerationConfig, HiggsAudioV2ForConditionalGeneration

    from higgs_ds.models.native.layout import missing_native_files

    assert missing_native_files(tiny_dir) == []
    model, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(
        tiny_dir, use_text_head=True, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    saved = load_file(tiny_dir / "model.safetensors")
    state = model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    config = model.config
    assert (config.model_type, config.num_codebooks, config.codebook_size) == ("higgs_audio_v2", 8, 1026)
    assert (config.audio_stream_bos_id, config.audio_stream_eos_id, config.rope_parameters["rope_type"]) == (
        1024, 1025, "llama3"
    )  # fmt: skip
    generation = GenerationConfig.from_pretrained(tiny_dir)
    assert (generation.ras_win_len, generation.ras_win_max_num_repeat) == (7, 2)
    assert (model.generation_config.ras_win_len, model.generation_config.eos_token_id) == (7, 265)  # <|eot_id|>


def test_extras_are_what_transformers_writes(tmp_path, tokenizer):
    """processor_config.json, chat_template.jinja and the tokenizer files equal HiggsAudioV2Processor's own
    save_pretrained output (its audio tokenizer built on the meta device: only its class and name are saved),
    with the feature extractor settings of transformers' converter."""
    from transformers import (
        DacFeatureExtractor,
        HiggsAudioV2Processor,
        HiggsAudioV2TokenizerConfig,
        HiggsAudioV2TokenizerModel,
    )

    from higgs_ds.models.native.layout import CHAT_TEMPLATE, write_native_extras

    with torch.device("meta"):
        codec = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig())
    codec.name_or_path = "bosonai/higgs-audio-v2-tokenizer"
    features = DacFeatureExtractor(
        feature_size=1, hop_length=1, padding_side="right", padding_value=0.0, sampling_rate=24000,
        return_attention_mask=True,
    )  # fmt: skip
    HiggsAudioV2Processor(features, tokenizer, codec, chat_template=CHAT_TEMPLATE).save_pretrained(tmp_path / "hf")
    write_native_extras(tmp_path / "ours", tokenizer)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text())
    template = "chat_template.jinja"
    assert (tmp_path / "ours" / template).read_text() == (tmp_path / "hf" / template).read_text()


def _small_codec(out):
    """A real HiggsAudioV2TokenizerModel with random weights and the release's geometry where the processor
    reads it (25 frames/s at 24 kHz, 8 quantizers), otherwise small."""
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    ratios = [8, 5, 4, 2, 3]
    acoustic = dict(encoder_hidden_size=8, downsampling_ratios=ratios, upsampling_ratios=ratios,
                    decoder_hidden_size=32, hidden_size=32)  # fmt: skip
    semantic = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    conv_dim=[32] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)  # fmt: skip
    config = HiggsAudioV2TokenizerConfig(
        target_bandwidths=[0.5, 1, 1.5, 2], acoustic_model_config=acoustic, semantic_model_config=semantic,
        codebook_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    HiggsAudioV2TokenizerModel(config).save_pretrained(out)
    return out


@pytest.mark.timeout(120)
def test_processor_loads_and_lays_out_audio_as_we_do(tmp_path, tokenizer):
    """HiggsAudioV2Processor.from_pretrained reads a tiny directory that refers to a local codec, and its
    own expansion of a conversation with one audio clip is our layout: the same input ids, the same framed
    and delayed audio_input_ids."""
    from transformers import HiggsAudioV2Processor

    from higgs_ds.models.native.batch import NativeCollator
    from higgs_ds.models.native.load import load_native_model
    from higgs_ds.models.native.tiny import write_tiny_native_model

    model_dir = write_tiny_native_model(tmp_path / "tiny", codec=_small_codec(tmp_path / "codec"))
    processor = HiggsAudioV2Processor.from_pretrained(model_dir)
    assert processor.audio_tokenizer.config.num_quantizers == 8
    conversation = [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": "Read this."},
        {"role": "assistant", "content": [{"type": "audio", "path": "clip.wav"}]},
    ]
    text = tokenizer.apply_chat_template(conversation, chat_template=processor.chat_template, tokenize=False)
    wave = np.sin(np.arange(24000 // 4) / 7.0).astype(np.float32) * 0.3
    inputs = processor(text=text, audio=[wave], return_tensors="pt")
    with torch.no_grad():
        features = processor.feature_extractor(wave, sampling_rate=24000, return_tensors="pt")
        codes = processor.audio_tokenizer.encode(features["input_values"]).audio_codes[0]  # (K, T)
    ids = tokenizer.encode(text, add_special_tokens=False)
    sample = EncodedSample("clip", np.array(ids), np.full(len(ids), X), codes.numpy(), [codes.shape[1]])
    config = load_native_model(model_dir).config
    ours = NativeCollator(config, tokenizer, round_to=1)([sample])
    assert ours["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert ours["audio_input_ids"].tolist() == inputs["audio_input_ids"].tolist()
    assert ours["audio_input_ids_mask"].tolist() == inputs["audio_input_ids_mask"].tolist()
