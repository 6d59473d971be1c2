"""What boson's HiggsAudioModel needs to train under HF/PEFT/SWIFT, applied to a loaded instance (the installed
boson_multimodal package is never edited):

* get_input_embeddings(): the class has none (its base_model_prefix names no submodule), and PEFT and
  HF's enable_input_require_grads call it;
* forward(labels=...): PEFT's causal-LM wrapper always passes labels=None, which forward does not take;
* activation checkpointing: the model rejects HF's gradient_checkpointing_enable(); instead each decoder
  layer's forward is recomputed in the backward pass (torch.utils.checkpoint).

It also names the audio side of both families, which `train_modules = "audio"` trains alone. The native
class needs none of the patches: it has get_input_embeddings and supports HF gradient checkpointing.
"""

from __future__ import annotations

import functools
import re
import types
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from higgs_ds.errors import UserError
from higgs_ds.models.family import BOSON, NATIVE, V3

# The audio side of a Higgs-Audio v2 model (DualFFN): per decoder layer the audio FFN and the two audio
# RMSNorms (audio positions go through them instead of mlp / the text norms), the audio head (text_lm_head,
# beside it, is text) and the codebook embeddings. Attention, embed_tokens, the text FFNs, norms and head and
# the final norm are shared with or belong to the text side. The two families name them differently:
# boson's HiggsAudioModel (audio_decoder_proj.audio_lm_head, audio_codebook_embeddings, layers.N at the top)
# and the native HiggsAudioV2ForConditionalGeneration (audio_lm_head, model.embed_audio_tokens, model.layers.N).
AUDIO_FFN_LINEARS = r"(model\.)?layers\.\d+\.audio_mlp\.(gate_proj|up_proj|down_proj)"
AUDIO_NORMS = ("audio_input_layernorm", "audio_post_attention_layernorm")


@dataclass(frozen=True)
class AudioSide:
    head_and_embeddings: tuple[str, ...]  # PEFT modules_to_save (module-name suffixes)
    parameters: str  # regex over parameter names (SWIFT's trainable_parameters_regex)


_LAYER_AUDIO = r"layers\.\d+\.(audio_mlp|" + "|".join(AUDIO_NORMS) + r")\."
AUDIO_SIDES = {
    BOSON: AudioSide(
        ("audio_lm_head", "audio_codebook_embeddings"),
        r"^(" + _LAYER_AUDIO + r"|audio_decoder_proj\.audio_lm_head\.|audio_codebook_embeddings\.)",
    ),
    NATIVE: AudioSide(
        ("audio_lm_head", "embed_audio_tokens.embed_audio_tokens"),  # not the wrapper module of the same name
        r"^(model\." + _LAYER_AUDIO + r"|audio_lm_head\.|model\.embed_audio_tokens\.)",
    ),
    # Higgs TTS 3 has no audio-only layers: its audio side is the fused codebook table, which is both the
    # audio input embedding and the (tied) audio head (higgs_ds.models.v3.modeling)
    V3: AudioSide(
        ("modality_embeddings.0.embedding",),  # the full suffix: "embedding" alone would match text_embedding
        r"^tied\.embedding\.modality_embeddings\.0\.embedding\.",
    ),
}
# boson's, as before (tests and older callers)
AUDIO_HEAD_AND_EMBEDDINGS = AUDIO_SIDES[BOSON].head_and_embeddings
AUDIO_PARAMETERS = AUDIO_SIDES[BOSON].parameters


def is_audio_parameter(name: str, family: str = BOSON) -> bool:
    """Whether a parameter (named as in the model's state dict) belongs to the audio side."""
    return re.search(AUDIO_SIDES[family].parameters, name) is not None


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
