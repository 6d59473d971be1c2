"""What HiggsAudioModel needs to train under HF/PEFT/SWIFT, applied to a loaded instance (the installed
boson_multimodal package is never edited):

* get_input_embeddings(): the class has none (its base_model_prefix names no submodule), and PEFT and
  HF's enable_input_require_grads call it;
* forward(labels=...): PEFT's causal-LM wrapper always passes labels=None, which forward does not take;
* activation checkpointing: the model rejects HF's gradient_checkpointing_enable(); instead each decoder
  layer's forward is recomputed in the backward pass (torch.utils.checkpoint).

It also names the model's audio side, which `train_modules = "audio"` trains alone.
"""

from __future__ import annotations

import functools
import re
import types

import torch
import torch.utils.checkpoint

from higgs_ds.errors import UserError

# The audio side of HiggsAudioModel (DualFFN): per decoder layer the audio FFN and the two audio RMSNorms
# (audio positions go through them instead of mlp / the text norms), the audio head inside
# audio_decoder_proj (text_lm_head, beside it, is text) and the codebook embeddings. Attention, embed_tokens,
# the text FFNs, norms and head and the final norm are shared with or belong to the text side.
AUDIO_FFN_LINEARS = r"layers\.\d+\.audio_mlp\.(gate_proj|up_proj|down_proj)"
AUDIO_NORMS = ("audio_input_layernorm", "audio_post_attention_layernorm")
AUDIO_HEAD_AND_EMBEDDINGS = ("audio_lm_head", "audio_codebook_embeddings")
AUDIO_PARAMETERS = (
    r"^(layers\.\d+\.(audio_mlp|" + "|".join(AUDIO_NORMS) + r")\."
    r"|audio_decoder_proj\.audio_lm_head\.|audio_codebook_embeddings\.)"
)


def is_audio_parameter(name: str) -> bool:
    """Whether a parameter of HiggsAudioModel (named as in its state dict) belongs to the audio side."""
    return re.search(AUDIO_PARAMETERS, name) is not None


def check_audio_side(model) -> None:
    """A model without DualFFN layers has no audio FFN: "audio" would train only the head and embeddings."""
    if not any(re.fullmatch(AUDIO_FFN_LINEARS, name) for name, _ in model.named_modules()):
        raise UserError(
            'train_modules = "audio" needs DualFFN decoder layers (layers.N.audio_mlp); this model has none '
            "(see audio_adapter_type and audio_dual_ffn_layers in its config.json)"
        )


def patch_for_training(model, activation_checkpointing: bool = False):
    model.get_input_embeddings = types.MethodType(lambda self: self.embed_tokens, model)
    forward = model.forward

    @functools.wraps(forward)  # keeps forward's signature visible: HF generate validates kwargs against it
    def forward_without_labels(*args, labels=None, **kwargs):
        return forward(*args, **kwargs)

    model.forward = forward_without_labels

    def gradient_checkpointing_enable(gradient_checkpointing_kwargs=None):
        """HF's switch, which the class refuses (SWIFT's --gradient_checkpointing, default true, calls it),
        mapped onto the per-layer wrapping; applied once however often it is called."""
        if not getattr(model, "higgs_ds_checkpointing", False):
            for layer in model.layers:
                layer.forward = _checkpointed(layer.forward)
            model.higgs_ds_checkpointing = True

    model.gradient_checkpointing_enable = gradient_checkpointing_enable
    if activation_checkpointing:
        gradient_checkpointing_enable()
    return model


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Keyword arguments travel in a partial: under DeepSpeed, SWIFT makes checkpoint() reentrant, and
        # the reentrant form takes positional tensors only (the masks and rotary tables in kwargs need no grad).
        return torch.utils.checkpoint.checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False)

    return run
