"""Tiny, real Higgs-Audio parts built offline: tokenizer, HiggsAudioModel and the audio codec.

They are the released classes with small sizes and random (seeded) weights, written to directories that
load through the same `from_pretrained(dir)` / codec-loader path as the released checkpoint. Nothing is
downloaded.

    higgs-ds tiny-model OUT_DIR [--family native|boson]   # this environment's family by default
    higgs-ds tiny-codec OUT_DIR      # this environment's codec class (native or boson's HiggsAudioTokenizer)

This module holds the tiny tokenizer (both families) and boson's tiny model; the native one is
higgs_ds.models.native.tiny.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The special tokens boson's prepare_chatml_sample, collator and generation use, in the order of their
# ids in the released Llama-3 tokenizer (128000...128027). The tiny tokenizer keeps that order after its
# 256 byte tokens, so id = 256 + (released id - 128000) for every token listed here.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",  # 128001, also pad
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",  # 128007
    "<|eom_id|>",  # 128008
    "<|eot_id|>",  # 128009
    "<|python_tag|>",
    "<|audio_bos|>",  # 128011
    "<|audio_eos|>",  # 128012
    "<|audio_out_bos|>",  # 128013
    "<|reserved_special_token_6|>",  # 128014 (the HF port's delay placeholder)
    "<|AUDIO|>",  # 128015
    "<|AUDIO_OUT|>",  # 128016
    "<|recipient|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
    "<|generation_instruction_start|>",
    "<|generation_instruction_end|>",
    "<SE>",
    "</SE>",
    "<SE_s>",
    "</SE_s>",
    "<SE_e>",
    "</SE_e>",
]
NUM_BYTE_TOKENS = 256
TINY_VOCAB_SIZE = 288  # 256 bytes + 28 specials, rounded up to a multiple of 8

# The codec's fixed geometry: every Higgs-Audio v2 checkpoint is trained on it.
CODEC_SAMPLE_RATE = 24000
CODEC_RATIOS = [8, 5, 4, 2, 3]  # hop 960 samples -> 25 frames/s
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024


def build_tiny_tokenizer():
    """A byte-level Llama-3-style fast tokenizer: one token per byte plus the Higgs special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == NUM_BYTE_TOKENS
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|begin_of_text|>", "<|end_of_text|>")],
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert fast.convert_tokens_to_ids(t) == NUM_BYTE_TOKENS + i, t
    return fast


# Text backbones: the tiny one of the tests and the demo, and the released one (Llama-3.2-3B shape).
TINY_TEXT = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
RELEASED_TEXT = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


def model_config(tokenizer, text: dict = TINY_TEXT):
    """HiggsAudioConfig shaped like the released one (dual FFN on every layer, delay pattern, 8 codebooks,
    audio-in as codes, no Whisper tower) around the given Llama text backbone. Special-token ids point at
    the tokenizer's, so the byte-level tiny tokenizer also drives a full-size model (benchmarks)."""
    import boson_multimodal.model.higgs_audio  # noqa: F401  registers AutoConfig/AutoModel "higgs_audio"
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        text,
        model_type="llama",
        rope_theta=500000.0,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|end_of_text|>"],
        pad_token_id=ids["<|end_of_text|>"],
        tie_word_embeddings=False,
    )
    layers = text["num_hidden_layers"]
    return HiggsAudioConfig(
        text_config=text_config,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=list(range(layers)),
        audio_ffn_hidden_size=text["hidden_size"],
        audio_ffn_intermediate_size=text["intermediate_size"],
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        use_delay_pattern=True,
        skip_audio_tower=True,
        audio_num_codebooks=NUM_CODEBOOKS,
        audio_codebook_size=CODEBOOK_SIZE,
        audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1,
        audio_in_token_idx=ids["<|AUDIO|>"],
        audio_out_token_idx=ids["<|AUDIO_OUT|>"],
        audio_out_bos_token_id=ids["<|audio_out_bos|>"],
        audio_eos_token_id=ids["<|audio_eos|>"],
        pad_token_id=ids["<|end_of_text|>"],
        hidden_size=text["hidden_size"],
    )


def write_tiny_model(out_dir: str | os.PathLike, seed: int = 0, text: dict = TINY_TEXT, dtype: str = "float32") -> Path:
    """Write a loadable random-weight HiggsAudioModel directory (config, safetensors, tokenizer)."""
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = model_config(tokenizer, text)
    torch.manual_seed(seed)
    model = HiggsAudioModel(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "higgs_ds_tiny.json").write_text(json.dumps({"kind": "random-weight model", "seed": seed}) + "\n")
    return out


def write_tiny(out_dir: str | os.PathLike, family: str | None = None, seed: int = 0, **kwargs) -> Path:
    """The tiny model of `family` (default: the family this environment trains), written to `out_dir`."""
    from higgs_ds.models.family import NATIVE, V3, environment_family

    if family == V3:
        from higgs_ds.models.v3.tiny_model import write_tiny_v3_model

        return write_tiny_v3_model(out_dir, seed=seed, **kwargs)
    if (family or environment_family()) == NATIVE:
        from higgs_ds.models.native.tiny import write_tiny_native_model

        return write_tiny_native_model(out_dir, seed=seed, **kwargs)
    return write_tiny_model(out_dir, seed=seed, **kwargs)
