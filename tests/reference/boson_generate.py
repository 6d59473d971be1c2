"""Boson's greedy generation, the reference for tests/test_native_generate.py (run in the boson environment).

    boson_generate.py PROMPTS_JSON OUT_DIR

PROMPTS_JSON: {"max_new_frames": N, "records": [{"json": shard-record json, "codes": (K, frames) list}, ...]}.
Writes OUT_DIR/boson_model (the tiny boson model, reshaped as below), OUT_DIR/reference.npz (per record id
the codes boson's HiggsAudioModel.generate gives, greedy, repetition-aware sampling off, through
higgs_ds.eval.generate.generate_codes: boson's own loop) and OUT_DIR/reference.json (per record id the
prompt's token ids from boson's own prepare_chatml_sample + the forced-audio suffix).

The tiny model (higgs_ds.models.tiny.write_tiny_model, init std 0.02) generates something trivial: its layers
barely move the residual stream, so each column is nearly a function of the one before and the prompt
hardly matters, and its EOS logit never wins. Before saving, so that greedy codes vary, depend on the prompt
and end at different points:
* every 2-D layer weight (attention, text and audio FFN) x LAYER_SCALE: attention to the prompt and the
  dual FFN count;
* the audio head's stream-BOS row of every codebook and stream-EOS rows of codebooks 1..K-1 set to zero
  (a logit of exactly 0, below the maximum of 1024 random logits): BOS only where the delay pattern forces
  it, and the audio ends by an EOS on codebook 0, as a trained model's does (the one case where boson's
  and transformers' delay-pattern bookkeeping force the same cells: higgs_ds/models/native/generate.py);
* codebook 0's EOS row x EOS_SCALE: EOS wins the argmax now and then, at prompt-dependent points.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

LAYER_SCALE = 5.0
EOS_SCALE = 3.0
HEAD = "audio_decoder_proj.audio_lm_head.weight"


def reshape_weights(model_dir: Path, num_codebooks: int, codebook_size: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    for name in weights:
        if name.startswith("layers.") and weights[name].ndim == 2:
            weights[name] = weights[name] * LAYER_SCALE
    rows = weights[HEAD].view(num_codebooks, codebook_size + 2, -1)  # a view: edits land in weights[HEAD]
    bos, eos = codebook_size, codebook_size + 1
    with torch.no_grad():
        rows[:, bos] = 0
        rows[1:, eos] = 0
        rows[0, eos] *= EOS_SCALE
    save_file(weights, str(path), metadata={"format": "pt"})


def main(prompts_json: str, out_dir: str) -> None:
    import torch
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from transformers import AutoTokenizer

    from higgs_ds.eval.generate import AUDIO_GEN_POSTFIX, generate_codes
    from higgs_ds.models.tiny import CODEBOOK_SIZE, NUM_CODEBOOKS, write_tiny_model

    torch.set_num_threads(1)
    spec = json.loads(Path(prompts_json).read_text())
    out = Path(out_dir)
    model_dir = write_tiny_model(out / "boson_model")
    reshape_weights(model_dir, NUM_CODEBOOKS, CODEBOOK_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = HiggsAudioModel.from_pretrained(model_dir).eval()

    codes, prompt_ids = {}, {}
    for item in spec["records"]:
        record = {"json": item["json"], "codes": np.asarray(item["codes"], np.int64)}
        sample_id = record["json"]["id"]
        messages = record["json"]["messages"]
        turns = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]  # before the target
        ids, _, _, _ = prepare_chatml_sample({"messages": turns}, tokenizer)
        prompt_ids[sample_id] = list(ids) + tokenizer.encode(AUDIO_GEN_POSTFIX, add_special_tokens=False)
        codes[sample_id] = generate_codes(
            model, tokenizer, record, max_new_frames=spec["max_new_frames"], temperature=0, ras_win_len=None
        )
    np.savez(out / "reference.npz", **codes)
    (out / "reference.json").write_text(json.dumps({"prompt_ids": prompt_ids}))


if __name__ == "__main__":
    main(*sys.argv[1:])
