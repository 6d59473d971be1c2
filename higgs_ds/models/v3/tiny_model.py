"""A tiny, real Higgs TTS 3 model built offline, in the released directory layout.

HiggsTTS3ForConditionalGeneration (transformers' Qwen3 layers + the fused codebook table) with small sizes and
random seeded weights, written as the release is (docs/research/higgs-tts-3-facts.md): config.json with the
release's keys (rope_theta null, audio_encoder_config, audio_token_id -100), one model.safetensors holding the
model's tensors, the tied copies and a bundled codec (the tiny native codec of `--codec tiny`, under
tied.embedding.modality_embeddings.0.model.*), an index that leaves the tied copies out, the tiny v3 tokenizer,
a generation config, and a LICENSE that says what it stands in for. Nothing is downloaded.

    higgs-ds tiny-model OUT_DIR --family v3
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from higgs_ds.models.tiny import TINY_TEXT
from higgs_ds.models.v3.tokenizer import EOS, TINY_V3_VOCAB_SIZE, build_tiny_v3_tokenizer

TINY_V3_TEXT = dict(TINY_TEXT, vocab_size=TINY_V3_VOCAB_SIZE)  # the v2 tiny backbone's sizes, v3's vocabulary
TINY_LICENSE = """\
This directory is a tiny random-weight test model written by higgs-ds (`higgs-ds tiny-model --family v3`).
It has the architecture of Higgs TTS 3 and none of its weights. It stands in for bosonai/higgs-tts-3-4b, whose
own LICENSE file holds the BOSON HIGGS TTS 3 RESEARCH AND NON-COMMERCIAL LICENSE AGREEMENT: exports of a real
fine-tune carry that text.
"""


def released_config(tokenizer, text: dict = TINY_V3_TEXT, dtype: str = "float32") -> dict:
    """config.json as the release writes it, around the given Qwen3 sizes."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    return {
        "architectures": ["HiggsMultimodalQwen3ForConditionalGeneration"],
        "model_type": "higgs_multimodal_qwen3",
        "audio_encoder_config": {
            "encoder_type": "discrete",
            "num_codebooks": 8,
            "vocab_size": 1026,
            "out_dim": text["hidden_size"],
            "tie_word_embeddings": True,
            "use_delay_pattern": True,
            "model_type": "higgs_audio_encoder",
        },
        "text_config": {
            "model_type": "qwen3",
            **text,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "rope_theta": None,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        "audio_token_id": -100,
        "mel_per_sample": 8,
        "eos_token_id": eos,
        "torch_dtype": dtype,
        "transformers_version": "5.5.0",
    }


def _tiny_codec_tensors() -> dict:
    """The tiny native codec's tensors (resolve_codec("tiny"): built once per machine, the codec the tests'
    shards are encoded with), under the bundled codec's prefix: like the release, the model carries its codec."""
    from safetensors.torch import load_file

    from higgs_ds.models.v3.checkpoint import CODEC_PREFIX
    from higgs_ds.shards.codec import resolve_codec

    codec = Path(resolve_codec("tiny").path)
    return {CODEC_PREFIX + k: v for k, v in load_file(codec / "model.safetensors").items()}


def write_tiny_v3_model(
    out_dir: str | os.PathLike, seed: int = 0, text: dict = TINY_V3_TEXT, dtype: str = "float32"
) -> Path:
    """Write a loadable random-weight Higgs TTS 3 directory in the released layout (see the module doc)."""
    import torch
    from safetensors.torch import save_file

    from higgs_ds.models.strict import INDEX_FILE, SINGLE_FILE
    from higgs_ds.models.v3.checkpoint import TIED_COPIES
    from higgs_ds.models.v3.modeling import HiggsTTS3Config, HiggsTTS3ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_v3_tokenizer()
    config_json = released_config(tokenizer, text, dtype)
    torch.manual_seed(seed)
    model = HiggsTTS3ForConditionalGeneration(HiggsTTS3Config.from_dict(config_json)).to(getattr(torch, dtype))
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    listed = dict.fromkeys(tensors, SINGLE_FILE)
    tensors.update({copy: tensors[source].clone() for copy, source in TIED_COPIES.items()})
    codec = _tiny_codec_tensors()
    tensors.update(codec)
    listed.update(dict.fromkeys(codec, SINGLE_FILE))
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": listed}  # the tied copies unlisted, as released
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    eos = config_json["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}) + "\n")
    tokenizer.save_pretrained(out)
    (out / "LICENSE").write_text(TINY_LICENSE)
    (out / "higgs_ds_tiny.json").write_text(
        json.dumps({"kind": "random-weight Higgs TTS 3 model", "seed": seed}) + "\n"
    )
    return out
