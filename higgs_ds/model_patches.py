"""What HiggsAudioModel needs to train under HF/PEFT/SWIFT, applied to a loaded instance (the installed
boson_multimodal package is never edited):

* get_input_embeddings(): the class has none (its base_model_prefix names no submodule), and PEFT and
  HF's enable_input_require_grads call it;
* forward(labels=...): PEFT's causal-LM wrapper always passes labels=None, which forward does not take;
* activation checkpointing: the model rejects HF's gradient_checkpointing_enable(); instead each decoder
  layer's forward is recomputed in the backward pass (torch.utils.checkpoint).
"""

from __future__ import annotations

import functools
import types

import torch
import torch.utils.checkpoint


def patch_for_training(model, activation_checkpointing: bool = False):
    model.get_input_embeddings = types.MethodType(lambda self: self.embed_tokens, model)
    forward = model.forward
    model.forward = lambda *args, labels=None, **kwargs: forward(*args, **kwargs)
    if activation_checkpointing:
        for layer in model.layers:
            layer.forward = _checkpointed(layer.forward)
    return model


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Keyword arguments travel in a partial: under DeepSpeed, SWIFT makes checkpoint() reentrant, and
        # the reentrant form takes positional tensors only (the masks and rotary tables in kwargs need no grad).
        return torch.utils.checkpoint.checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False)

    return run
