"""Higgs TTS 3 as a transformers model: our config and our small model class around transformers' Qwen3.

Written from the public inference sources' facts (docs/research/higgs-tts-3-facts.md, sections 1-3), not from
their code. The parameter names are the release's checkpoint keys, so the released model.safetensors loads
without renaming (the bundled codec and the tied copies aside, see higgs_ds.models.v3.checkpoint):

    body.layers.N.*, body.norm.weight                      transformers' Qwen3Model (its own embed_tokens unused)
    tied.embedding.text_embedding.weight          [V, H]   the text embedding (and, tied, the text head)
    tied.embedding.modality_embeddings.0.embedding.weight  [8 * 1026, H]: the fused codebook table

An audio position's input is the SUM over codebooks c of table[c * 1026 + code_c] and replaces (is not added
to) the text embedding; the audio logits are the final normed hidden state times the same table, (.., 8, 1026).
Both uses go through one module (FusedCodebooks.forward, head=True for the head): under ZeRO-3 its weight is
gathered by that module's own hooks, and PEFT's modules_to_save copies it once, so the tie survives LoRA.
No text head is used: v3 training has no text targets (higgs_ds.models.v3.logits).

The config is ours, registered with AutoConfig in this process (register_v3): the release's config.json reads
without trust_remote_code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel, Qwen3Config, Qwen3Model
from transformers.utils import ModelOutput

from higgs_ds.errors import UserError

log = logging.getLogger(__name__)

MODEL_TYPE = "higgs_multimodal_qwen3"
ARCHITECTURE = "HiggsMultimodalQwen3ForConditionalGeneration"
RELEASED_ROPE_THETA = 1_000_000.0  # the release's text_config says null; every port uses 1e6
AUDIO_ENCODER_DEFAULTS = {
    "encoder_type": "discrete",
    "num_codebooks": 8,
    "vocab_size": 1026,
    "tie_word_embeddings": True,
    "use_delay_pattern": True,
    "model_type": "higgs_audio_encoder",
}


_said = {"rope": False}  # the rope fix is logged once per process (configs are copied often)


def _text_config(text_config) -> Qwen3Config:
    """Qwen3Config of the release's text_config dict, with rope theta 1e6 where the file says null."""
    if isinstance(text_config, Qwen3Config):
        return text_config
    values = dict(text_config or {})
    values.pop("model_type", None)
    rope = dict(values.get("rope_parameters") or {})
    theta = values.pop("rope_theta", None)
    if rope.get("rope_theta") is None:
        if theta is None and not _said["rope"]:
            _said["rope"] = True
            log.info("text_config rope_theta is null: using %g, as every Higgs TTS 3 port does", RELEASED_ROPE_THETA)
        rope = {"rope_type": rope.get("rope_type", "default"), **rope, "rope_theta": theta or RELEASED_ROPE_THETA}
    values["rope_parameters"] = rope
    return Qwen3Config(**values)


class HiggsTTS3Config(PretrainedConfig):
    model_type = MODEL_TYPE
    sub_configs = {"text_config": Qwen3Config}

    def __init__(self, text_config=None, audio_encoder_config=None, audio_token_id=-100, mel_per_sample=8, **kwargs):
        self.text_config = _text_config(text_config)
        self.audio_encoder_config = {**AUDIO_ENCODER_DEFAULTS, **(audio_encoder_config or {})}
        self.audio_token_id = audio_token_id
        self.mel_per_sample = mel_per_sample
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)

    @property
    def num_codebooks(self) -> int:
        return int(self.audio_encoder_config["num_codebooks"])

    @property
    def codebook_size(self) -> int:
        """Ids per codebook: 1024 codes + BOC (1024) + EOC (1025)."""
        return int(self.audio_encoder_config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size


def check_v3_config(config: HiggsTTS3Config, where) -> None:
    """The audio geometry higgs-ds trains: discrete codes, 8 codebooks of 1026 ids, the head tied."""
    audio = config.audio_encoder_config
    wrong = {
        k: audio.get(k)
        for k, v in (
            ("encoder_type", "discrete"),
            ("num_codebooks", 8),
            ("vocab_size", 1026),
            ("tie_word_embeddings", True),
        )
        if audio.get(k) != v
    }
    out_dim = audio.get("out_dim")
    if out_dim is not None and out_dim != config.text_config.hidden_size:
        wrong["out_dim"] = out_dim
    if wrong:
        raise UserError(
            f"{where}: audio_encoder_config {wrong} is not Higgs TTS 3's TTS geometry (discrete codes, 8 codebooks of "
            "1026 ids, the audio head tied to the codebook table, out_dim = text hidden_size): higgs-ds trains that one"
        )


def register_v3() -> None:
    """AutoConfig knows "higgs_multimodal_qwen3" in this process (no remote code); idempotent."""
    AutoConfig.register(MODEL_TYPE, HiggsTTS3Config, exist_ok=True)


class FusedCodebooks(nn.Embedding):
    """The [K * V, H] table: forward(codes (..., K)) -> summed input embeddings (..., H); forward(hidden (..., H),
    head=True) -> audio logits (..., K, V)."""

    def __init__(self, num_codebooks: int, codebook_size: int, hidden_size: int):
        super().__init__(num_codebooks * codebook_size, hidden_size)
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size

    def forward(self, x: torch.Tensor, head: bool = False) -> torch.Tensor:
        if head:
            return F.linear(x, self.weight).unflatten(-1, (self.num_codebooks, self.codebook_size))
        offsets = torch.arange(self.num_codebooks, device=x.device) * self.codebook_size
        return F.embedding(x + offsets, self.weight).sum(-2)


class _Modality(nn.Module):
    def __init__(self, config: HiggsTTS3Config):
        super().__init__()
        self.embedding = FusedCodebooks(config.num_codebooks, config.codebook_size, config.text_config.hidden_size)


class _Embeddings(nn.Module):
    def __init__(self, config: HiggsTTS3Config):
        super().__init__()
        text = config.text_config
        self.text_embedding = nn.Embedding(text.vocab_size, text.hidden_size)
        self.modality_embeddings = nn.ModuleList([_Modality(config)])


class _Tied(nn.Module):
    def __init__(self, config: HiggsTTS3Config):
        super().__init__()
        self.embedding = _Embeddings(config)


@dataclass
class HiggsTTS3Output(ModelOutput):
    audio_logits: torch.Tensor | None = None
    past_key_values: object | None = None
    last_hidden_state: torch.Tensor | None = None


class HiggsTTS3ForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Higgs TTS 3: transformers' Qwen3Model + the fused codebook table (see the module doc). GenerationMixin
    only because PEFT's causal-LM wrapper expects it; generation is higgs_ds.models.v3.generate's loop."""

    config: HiggsTTS3Config
    config_class = HiggsTTS3Config
    base_model_prefix = "body"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # the release's bundled codec and tied copies (higgs_ds.models.v3.checkpoint checks them itself)
    _keys_to_ignore_on_load_unexpected = [r"^tied\.embedding\.modality_embeddings\.0\.model\.", r"^tied\.head\."]

    def __init__(self, config: HiggsTTS3Config):
        super().__init__(config)
        self.body = Qwen3Model(config.text_config)
        self.body.embed_tokens = None  # the text embedding is tied.embedding.text_embedding (the release's name)
        self.tied = _Tied(config)
        self.post_init()

    @property
    def fused(self) -> nn.Module:
        """The fused codebook table (inside PEFT: its ModulesToSaveWrapper)."""
        return self.tied.embedding.modality_embeddings[0].embedding

    def get_input_embeddings(self) -> nn.Module:
        return self.tied.embedding.text_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.tied.embedding.text_embedding = value

    def get_output_embeddings(self):
        return None  # no text head (its tied copy is the text embedding); the audio head is the fused table

    def prepare_inputs_for_generation(self, input_ids, **kwargs) -> dict:
        """PEFT's causal-LM wrapper reads this when it wraps the model; v3 generates with its own loop
        (higgs_ds.models.v3.generate), not transformers' generate()."""
        return {"input_ids": input_ids, **kwargs}

    def embed(self, input_ids, audio_in_codes=None, audio_in_mask=None) -> torch.Tensor:
        """Text embeddings with the audio_in_mask positions replaced by their rows' summed codebook vectors."""
        embeds = self.tied.embedding.text_embedding(input_ids)
        if audio_in_mask is None or audio_in_codes is None:
            return embeds
        audio = self.fused(audio_in_codes).to(embeds.dtype)  # (M, H), in the backbone's dtype as the ports do
        return embeds.masked_scatter(audio_in_mask.unsqueeze(-1), audio)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        audio_in_codes: torch.Tensor | None = None,
        audio_in_mask: torch.Tensor | None = None,
        audio_out_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        labels=None,
        **kwargs,
    ) -> HiggsTTS3Output:
        """audio_logits (N, K, V) of the audio_out_mask positions (row-major), or (B, S, K, V) without a mask.
        `inputs_embeds` and `labels` are there for PEFT's wrapper, which passes them (as None): the loss is
        higgs_ds.train.loss's, never the model's."""
        if labels is not None:
            raise ValueError("HiggsTTS3ForConditionalGeneration computes no loss: use higgs_ds.train.loss.higgs_loss")
        for key in ("output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(key, None)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, audio_in_codes, audio_in_mask)
        out = self.body(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        picked = hidden if audio_out_mask is None else hidden[audio_out_mask]
        return HiggsTTS3Output(self.fused(picked, head=True), out.past_key_values, hidden)
