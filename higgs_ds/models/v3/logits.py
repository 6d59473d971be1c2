"""The v3 model's logits for our loss (higgs_ds.models.interface.logits_for_loss).

The forward runs through the outermost module (a DeepSpeed engine, a PEFT model or the plain model: ZeRO-3
starts each step's parameter trace in the root module's forward hook), and the model applies the tied audio
head inside its own forward to the audio-out positions only, so no weight is touched outside a module call.
v3 trains no text (every text label is -100), so no text logits are computed: a (B, S, 1) zero tensor
stands in for them, which higgs_loss reads only at text targets (there are none).
"""

from __future__ import annotations

import torch

# The batch keys the forward reads (higgs_ds.models.v3.batch.V3Collator makes them).
V3_MODEL_INPUTS = ("input_ids", "attention_mask", "audio_in_codes", "audio_in_mask", "audio_out_mask")


def v3_model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in V3_MODEL_INPUTS}


def v3_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_logits (B, S, 1) zeros, audio_logits (N, 8, 1026) float32 of the audio_out_mask positions)."""
    labels = batch["label_ids"]
    if (labels != -100).any():
        raise ValueError("a v3 batch with text targets: the v3 collator trains audio only")
    out = model(**v3_model_inputs(batch), use_cache=False)
    text = torch.zeros((*labels.shape, 1), device=out.audio_logits.device)
    return text, out.audio_logits.float()
