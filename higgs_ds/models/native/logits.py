"""The native model's logits for our loss: text logits at every position, audio logits at the audio-out
positions only (boson's HiggsAudioModel returns the same pair; its forward computes no loss either).

The model's own forward applies the audio head to every position ((B, S, K * 1026) logits) and computes
its own loss (the processor's label semantics, summed over codebooks). Instead the forward runs through the
outermost module (a DeepSpeed engine, a PEFT model or the plain model: ZeRO-3 starts each step's parameter
trace in the root module's forward hook) with `logits_to_keep` empty, so the audio head sees no position
there, and the final hidden states come back as `hidden_states[-1]` (transformers ties it to the normed
last_hidden_state). The two heads are then called as modules, so ZeRO-3's per-module hooks gather their
weights and PEFT's LoRA / modules_to_save wrappers apply; no weight is touched directly.
"""

from __future__ import annotations

import torch

# The batch keys the forward reads (higgs_ds.models.native.batch.NativeCollator makes them).
NATIVE_MODEL_INPUTS = ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask")


def unwrap(model):
    """HiggsAudioV2ForConditionalGeneration inside a DeepSpeed engine / DDP (`.module`) or a PEFT model
    (whose LoRA layers live in the base model's modules)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def native_model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in NATIVE_MODEL_INPUTS}


def native_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_logits (B, S, vocab), audio_logits (N, K, codebook_size) float32): the audio logits of the N
    positions of batch["audio_out_mask"] in row-major order, the columns of batch["label_audio_ids"]."""
    higgs = unwrap(model)
    config = higgs.config
    if higgs.text_lm_head is None:
        raise ValueError("the model was built without its text head: load it with use_text_head=True")
    device = batch["input_ids"].device
    out = model(
        **native_model_inputs(batch),
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=torch.zeros(0, dtype=torch.long, device=device),
    )
    hidden = out.hidden_states[-1]
    text_logits = higgs.text_lm_head(hidden)
    audio_hidden = hidden[batch["audio_out_mask"].to(hidden.device)]
    audio_logits = higgs.audio_lm_head(audio_hidden)
    return text_logits, audio_logits.view(-1, config.num_codebooks, config.codebook_size).float()
