"""A tiny, real transformers-native Higgs-Audio v2 model built offline: HiggsAudioV2ForConditionalGeneration
with the text head, small sizes (higgs_ds.models.tiny.TINY_TEXT) and random seeded weights, in a directory
laid out like Boson's current `main` (layout.py). Nothing is downloaded.

The release's geometry is kept where the code depends on it: 8 codebooks of 1026 ids (1024 codes + stream
BOS 1024 + EOS 1025), dual FFN on every layer, llama3 rope (the native default, whose inverse frequencies
equal the boson release's), special-token ids of the tiny byte-level tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from higgs_ds.models.native.layout import DEFAULT_AUDIO_TOKENIZER, write_native_extras
from higgs_ds.models.tiny import CODEBOOK_SIZE, NUM_CODEBOOKS, TINY_TEXT, build_tiny_tokenizer

TINY_CODEC_DIR = "audio_tokenizer"  # where write_tiny_native_model puts its tiny codec, inside the model dir


def native_config(tokenizer, text: dict = TINY_TEXT):
    """HiggsAudioV2Config around the given Llama sizes, token ids from `tokenizer` (pad/bos/eos as
    higgs_ds.models.tiny.model_config sets them for boson's tiny model)."""
    from transformers import HiggsAudioV2Config

    ids = tokenizer.convert_tokens_to_ids
    # a rope_scaling in `text` (RELEASED_TEXT's, boson's spelling) is the release's llama3 rope, which the
    # native default rope_parameters reproduce: the default is kept
    sizes = {k: v for k, v in text.items() if k != "rope_scaling"}
    return HiggsAudioV2Config(
        **sizes,
        num_codebooks=NUM_CODEBOOKS,
        codebook_size=CODEBOOK_SIZE + 2,
        audio_stream_bos_id=CODEBOOK_SIZE,
        audio_stream_eos_id=CODEBOOK_SIZE + 1,
        audio_token_id=ids("<|AUDIO_OUT|>"),
        audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"),
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|end_of_text|>"),
        pad_token_id=ids("<|end_of_text|>"),
        tie_word_embeddings=False,
    )


def _tiny_codec(out_dir: Path, seed: int) -> Path:
    """This environment's tiny native codec (higgs_ds.shards.codec), for the processor to refer to."""
    from higgs_ds.models.family import NATIVE, codec_family
    from higgs_ds.shards.codec import write_tiny_codec

    codec = Path(write_tiny_codec(out_dir, seed=seed))
    if codec_family(codec) != NATIVE:
        raise RuntimeError(f"{codec}: write_tiny_codec wrote a {codec_family(codec)}-format codec, not a native one")
    return codec


def write_tiny_native_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    text: dict = TINY_TEXT,
    dtype: str = "float32",
    codec: str | os.PathLike | None = None,
) -> Path:
    """Write a loadable random-weight native model directory. `codec` is the audio tokenizer that
    processor_config.json refers to: None Boson's codec repository, as the release does (the model loads
    offline, HiggsAudioV2Processor only with that codec in the Hugging Face cache); "tiny" a tiny native codec
    written into OUT/audio_tokenizer (HiggsAudioV2Processor.from_pretrained(OUT) works offline); a path
    that codec directory."""
    import torch
    from transformers import HiggsAudioV2ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = native_config(tokenizer, text)
    torch.manual_seed(seed)
    model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).to(getattr(torch, dtype))
    model.save_pretrained(out)  # config.json + model.safetensors; write_native_extras replaces its generation config
    if codec == "tiny":
        codec = _tiny_codec(out / TINY_CODEC_DIR, seed)
    write_native_extras(out, tokenizer, DEFAULT_AUDIO_TOKENIZER if codec is None else codec)
    (out / "higgs_ds_tiny.json").write_text(json.dumps({"kind": "random-weight native model", "seed": seed}) + "\n")
    return out
