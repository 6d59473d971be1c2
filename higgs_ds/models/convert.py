"""Converting a Higgs-Audio v2 model between the two families, exactly or not at all.

    higgs-ds convert DIR --to native|boson --out OUT
    convert_model(src_dir, "native" | "boson", out_dir) -> Path

- boson: boson_multimodal's `HiggsAudioModel` (config model_type "higgs_audio"): revision 10840182 of
  bosonai/higgs-audio-v2-generation-3B-base, community fine-tunes made with boson's code, and what
  `higgs-ds export --format boson` writes.
- native: transformers' `HiggsAudioV2ForConditionalGeneration` (model_type "higgs_audio_v2"): Boson's `main`
  branch since April 2026.

Only config.json, the tokenizer files and the safetensors files are read (tensors through safetensors, never
a pickle) and no model class is built, so the tensors and config convert in either environment. Both
classes hold the same modules under other names (tests/test_convert.py checks this table against both real
classes):

    boson                                      native
    embed_tokens.weight                        model.embed_tokens.weight
    layers.N.X  (self_attn.{q,k,v,o}_proj, mlp.*, input_layernorm, post_attention_layernorm and the audio FFN
                 audio_mlp.*, audio_input_layernorm, audio_post_attention_layernorm)     model.layers.N.X
    norm.weight                                model.norm.weight
    audio_codebook_embeddings.weight           model.embed_audio_tokens.embed_audio_tokens.weight
    audio_decoder_proj.audio_lm_head.weight    audio_lm_head.weight
    audio_decoder_proj.text_lm_head.weight     text_lm_head.weight

The audio tables have K x (codes + 2) rows in both (boson adds the stream BOS/EOS to audio_codebook_size;
native's codebook_size counts them). A boson checkpoint saved while a table was partially frozen
(`freeze_llm(freeze_embed_until_idx=...)`, `freeze_text_head(freeze_text_head_until_idx=...)`) stores it as
two halves, `X.embedding_frozen.weight` + `X.embedding_trainable.weight` (`X.linear_frozen/trainable` for a
head): they are concatenated along the rows, as boson's own merge_weights_from_checkpoint does. Buffers a
class recomputes from its config (rotary inv_freq, audio_codebook_weights, audio_tokens_offsets) are dropped.

Every tensor is copied bit for bit (same bytes, same dtype). Refused, with a UserError naming the directory
and the key or setting: a missing, unexpected or mis-shaped weight; halves of different dtypes; a boson
architecture the native class cannot compute (see BOSON_REQUIRED); a rope type other than default/llama3;
token ids that disagree with the tokenizer; an existing non-empty --out. The output is built in a temp
folder beside --out and renamed into place; nothing else is written or deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.models.family import BOSON, FAMILIES, NATIVE, FamilyError, codec_family, model_family
from higgs_ds.models.strict import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorHeader,
    check_state_dict_matches,
    mismatch_message,
    read_headers,
)
from higgs_ds.models.trust import model_file
from higgs_ds.safe_io import fsync_dir, fsync_tree

NATIVE_ARCH, BOSON_ARCH = "HiggsAudioV2ForConditionalGeneration", "HiggsAudioModel"
NATIVE_VERSION, BOSON_VERSION = "5.19.0", "4.46.3"  # the transformers each environment pins
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
CARRIED_FILES = ("codec.json",)  # higgs-ds export's note of the codec the model was trained with

# Special tokens whose ids one config names and the other takes from the tokenizer.
AUDIO_IN, AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS = "<|AUDIO|>", "<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>"
AUDIO_DELAY = "<|reserved_special_token_6|>"  # the native layout's per-frame delay placeholder

# Class defaults, for settings a config.json leaves out (tests/test_convert.py checks them against the classes).
LLAMA_DEFAULTS = dict(  # transformers 4.46.3 LlamaConfig, boson's text_config
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, pretraining_tp=1,
    tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
    mlp_bias=False, head_dim=None,
)  # fmt: skip
BOSON_DEFAULTS = dict(  # boson_multimodal 0.1.1 HiggsAudioConfig
    audio_adapter_type="stack", audio_embed_avg=False, audio_dual_ffn_layers=None, audio_decoder_proj_num_layers=0,
    encode_whisper_embed=True, encode_audio_in_tokens=False, use_delay_pattern=False, skip_audio_tower=False,
    use_audio_out_embed_projector=False, use_audio_out_self_attention=False, use_rq_transformer=False,
    audio_num_codebooks=12, audio_codebook_size=1024, audio_stream_bos_id=1024, audio_stream_eos_id=1025,
    audio_in_token_idx=128015, audio_out_token_idx=128016, pad_token_id=128001, audio_out_bos_token_id=128013,
    audio_eos_token_id=128012,
)  # fmt: skip
NATIVE_DEFAULTS = dict(  # transformers 5.19 HiggsAudioV2Config
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-5, use_cache=True, pad_token_id=128001, bos_token_id=1, eos_token_id=128009, pretraining_tp=1,
    tie_word_embeddings=False, rope_parameters=None, attention_bias=False, attention_dropout=0.0, mlp_bias=False,
    head_dim=128, num_codebooks=8, codebook_size=1024, audio_token_id=128016, audio_bos_token_id=128013,
    audio_delay_token_id=128014, audio_stream_bos_id=1024, audio_stream_eos_id=1025,
)  # fmt: skip
NATIVE_DEFAULT_ROPE = {  # what HiggsAudioV2Config sets when rope_parameters is absent
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.125,
    "high_freq_factor": 0.5, "original_max_position_embeddings": 1024,
}  # fmt: skip
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# boson settings the native class has no counterpart for: converting is exact only at these values (the
# released model's), and why.
BOSON_REQUIRED = {
    "audio_decoder_proj_num_layers": (0, "the native audio head is a single linear layer"),
    "use_audio_out_embed_projector": (False, "the native audio embedding has no projector"),
    "use_audio_out_self_attention": (False, "native layers have no separate audio attention"),
    "encode_whisper_embed": (False, "the native model has no Whisper features"),
    "skip_audio_tower": (True, "the native model has no Whisper audio tower"),
    "encode_audio_in_tokens": (True, "native embeds every audio item as codes"),
    "audio_embed_avg": (False, "native sums the codebook embeddings"),
    "use_delay_pattern": (True, "the native layout always delays codebooks"),
    "use_rq_transformer": (False, "the native model has no RQ-transformer"),
}
# Buffers some checkpoints carry that the classes recompute from the config (never read from a file).
BOSON_DROPPED = re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.(original_)?inv_freq|audio_codebook_weights")
NATIVE_DROPPED = re.compile(r"model\.rotary_emb\.(original_)?inv_freq|model\.embed_audio_tokens\.audio_tokens_offsets")
HALVES = (("embedding_frozen", "embedding_trainable"), ("linear_frozen", "linear_trainable"))


class ConvertError(UserError):
    pass


# --------------------------------------------------------------------------------- the neutral description


@dataclass(frozen=True)
class Arch:
    """What fixes the tensors' names and shapes, in neither family's words."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_codebooks: int
    codebook_rows: int  # per codebook: the codes + stream BOS + stream EOS (1026)
    attention_bias: bool
    mlp_bias: bool


@dataclass(frozen=True)
class ModelSpec:
    """A whole config in neither family's words: the architecture, the Llama settings, rope, token ids."""

    arch: Arch
    llama: dict  # hidden_act, rms_norm_eps, max_position_embeddings, initializer_range, attention_dropout, use_cache
    rope: dict  # rope_parameters form: rope_type, rope_theta (+ the llama3 keys)
    ids: dict  # bos, eos, pad, audio_in, audio_out, audio_out_bos, audio_eos, audio_delay, stream_bos, stream_eos
    dtype: str | None


LLAMA_SETTINGS = ("hidden_act", "rms_norm_eps", "max_position_embeddings", "initializer_range", "attention_dropout",
                  "use_cache")  # fmt: skip


def weight_table(arch: Arch) -> list[tuple[str, str, tuple[int, ...]]]:
    """(boson key, native key, shape) of every weight of this architecture."""
    h, inner = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    audio_rows = arch.num_codebooks * arch.codebook_rows
    table = [
        ("embed_tokens.weight", "model.embed_tokens.weight", (arch.vocab_size, h)),
        ("norm.weight", "model.norm.weight", (h,)),
        ("audio_codebook_embeddings.weight", "model.embed_audio_tokens.embed_audio_tokens.weight", (audio_rows, h)),
        ("audio_decoder_proj.audio_lm_head.weight", "audio_lm_head.weight", (audio_rows, h)),
        ("audio_decoder_proj.text_lm_head.weight", "text_lm_head.weight", (arch.vocab_size, h)),
    ]
    per_layer = [(f"self_attn.{p}_proj", rows, h, arch.attention_bias) for p, rows in (("q", q), ("k", kv), ("v", kv))]
    per_layer.append(("self_attn.o_proj", h, q, arch.attention_bias))
    for mlp in ("mlp", "audio_mlp"):
        per_layer += [(f"{mlp}.gate_proj", inner, h, arch.mlp_bias), (f"{mlp}.up_proj", inner, h, arch.mlp_bias),
                      (f"{mlp}.down_proj", h, inner, arch.mlp_bias)]  # fmt: skip
    norms = ("input_layernorm", "post_attention_layernorm", "audio_input_layernorm", "audio_post_attention_layernorm")
    for i in range(arch.num_layers):
        for name, rows, cols, bias in per_layer:
            table.append((f"layers.{i}.{name}.weight", f"model.layers.{i}.{name}.weight", (rows, cols)))
            if bias:
                table.append((f"layers.{i}.{name}.bias", f"model.layers.{i}.{name}.bias", (rows,)))
        table += [(f"layers.{i}.{n}.weight", f"model.layers.{i}.{n}.weight", (h,)) for n in norms]
    return table


def expected_shapes(arch: Arch, family: str) -> dict[str, tuple[int, ...]]:
    """The state dict (key -> shape) of `family`'s class for this architecture."""
    column = 0 if family == BOSON else 1
    return {row[column]: row[2] for row in weight_table(arch)}


# ------------------------------------------------------------------------------------------ reading configs


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return value


def special_token_ids(model_dir: Path) -> dict[str, int]:
    """Added tokens -> ids, from tokenizer.json (else tokenizer_config.json's added_tokens_decoder)."""
    ids: dict[str, int] = {}
    if (model_dir / "tokenizer.json").is_file():
        for token in _read_json(model_dir / "tokenizer.json").get("added_tokens") or []:
            if isinstance(token, dict) and isinstance(token.get("content"), str) and isinstance(token.get("id"), int):
                ids[token["content"]] = token["id"]
    if not ids and (model_dir / "tokenizer_config.json").is_file():
        decoder = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for key, token in decoder.items() if isinstance(decoder, dict) else ():
            if isinstance(token, dict) and isinstance(token.get("content"), str) and str(key).isdigit():
                ids[token["content"]] = int(key)
    if not ids:
        raise ConvertError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer_config.json with its special tokens): "
            "conversion needs it for the audio token ids; copy the model's tokenizer files into it"
        )
    return ids


def _token(tokens: dict, token: str, model_dir: Path) -> int:
    if token not in tokens:
        raise ConvertError(f"{model_dir}: the tokenizer has no {token} token, which Higgs-Audio v2 needs")
    return tokens[token]


def _int(cfg: dict, key: str, where: str, minimum: int = 1) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConvertError(f"{where}: {key} = {value!r} is not an integer >= {minimum}")
    return value


def _flag(cfg: dict, key: str, where: str) -> bool:
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise ConvertError(f"{where}: {key} = {value!r} is not true/false")
    return value


def _arch(cfg: dict, where: str, codebooks: int, codebook_rows: int) -> Arch:
    """The Llama backbone's shapes from a flat dict of Llama settings (boson's text_config, or native's config)."""
    heads = _int(cfg, "num_attention_heads", where)
    hidden = _int(cfg, "hidden_size", where)
    kv = cfg.get("num_key_value_heads")
    head_dim = cfg.get("head_dim")
    return Arch(
        vocab_size=_int(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", where),
        num_layers=_int(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=heads if kv is None else _int(cfg, "num_key_value_heads", where),
        head_dim=hidden // heads if head_dim is None else _int(cfg, "head_dim", where),
        num_codebooks=codebooks,
        codebook_rows=codebook_rows,
        attention_bias=_flag(cfg, "attention_bias", where),
        mlp_bias=_flag(cfg, "mlp_bias", where),
    )


def _rope(rope_type, theta, params: dict, where: str) -> dict:
    """rope_parameters (native's form) for a default or llama3 rope; anything else is refused."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConvertError(f"{where}: rope_theta = {theta!r} is not a positive number")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta", *LLAMA3_KEYS})
    if rope_type not in ("default", "llama3") or extra:
        what = f"rope settings {extra}" if extra else f"rope_type {rope_type!r}"
        raise ConvertError(
            f"{where}: {what}: only the default and llama3 ropes are converted (their inverse frequencies are "
            "checked equal in both classes)"
        )
    if rope_type == "default":
        return {"rope_type": "default", "rope_theta": float(theta)}
    missing = [k for k in LLAMA3_KEYS if k not in params]
    if missing:
        raise ConvertError(f"{where}: the llama3 rope lacks {', '.join(missing)}")
    return {"rope_type": "llama3", "rope_theta": float(theta), **{k: params[k] for k in LLAMA3_KEYS}}


def _check_boson_architecture(cfg: dict, layers: int, where: str) -> None:
    for key, (value, why) in BOSON_REQUIRED.items():
        if cfg[key] != value or isinstance(cfg[key], str):
            raise ConvertError(
                f"{where}: {key} = {json.dumps(cfg[key])}: the native class cannot express it ({why}; it needs "
                f"{json.dumps(value)}); keep this model in the boson format"
            )
    if cfg["audio_adapter_type"] not in ("dual_ffn", "dual_ffn_fast_forward"):
        raise ConvertError(
            f"{where}: audio_adapter_type = {cfg['audio_adapter_type']!r}: the native class has a dual FFN in every "
            "layer (dual_ffn / dual_ffn_fast_forward); keep this model in the boson format"
        )
    dual = cfg["audio_dual_ffn_layers"]
    if not isinstance(dual, list) or sorted(set(dual)) != list(range(layers)) or any(isinstance(i, bool) for i in dual):
        raise ConvertError(
            f"{where}: audio_dual_ffn_layers = {json.dumps(dual)} does not list every one of the {layers} layers: "
            "the native class has the audio FFN in every layer; keep this model in the boson format"
        )


def boson_spec(model_dir: Path) -> ModelSpec:
    """A boson config.json (+ its tokenizer's ids) as a ModelSpec, refusing what the native class cannot hold."""
    where = f"{model_dir}/config.json"
    cfg = dict(BOSON_DEFAULTS, **_read_json(model_dir / "config.json"))
    text = cfg.get("text_config") or {}
    if not isinstance(text, dict) or text.get("model_type", "llama") != "llama":
        raise ConvertError(f"{where}: text_config must be a Llama backbone (model_type 'llama')")
    text = dict(LLAMA_DEFAULTS, **text)
    twhere = f"{where} text_config"
    if text["pretraining_tp"] != 1:
        raise ConvertError(f"{twhere}: pretraining_tp = {text['pretraining_tp']!r}: only 1 converts exactly")
    codebooks, codes = _int(cfg, "audio_num_codebooks", where), _int(cfg, "audio_codebook_size", where)
    arch = _arch(text, twhere, codebooks, codes + 2)
    _check_boson_architecture(cfg, arch.num_layers, where)
    scaling = text["rope_scaling"] or {}
    if not isinstance(scaling, dict):
        raise ConvertError(f"{twhere}: rope_scaling = {scaling!r} is not an object")
    rope = _rope(scaling.get("rope_type", scaling.get("type", "default")), text["rope_theta"], scaling, twhere)
    tokens = special_token_ids(model_dir)
    ids = dict(bos=text["bos_token_id"], eos=text["eos_token_id"], pad=cfg["pad_token_id"],
               audio_in=cfg["audio_in_token_idx"], audio_out=cfg["audio_out_token_idx"],
               audio_out_bos=cfg["audio_out_bos_token_id"], audio_eos=cfg["audio_eos_token_id"],
               audio_delay=_token(tokens, AUDIO_DELAY, model_dir),
               stream_bos=cfg["audio_stream_bos_id"], stream_eos=cfg["audio_stream_eos_id"])  # fmt: skip
    for key, token in (("audio_in_token_idx", AUDIO_IN), ("audio_out_token_idx", AUDIO_OUT),
                       ("audio_out_bos_token_id", AUDIO_OUT_BOS), ("audio_eos_token_id", AUDIO_EOS)):  # fmt: skip
        _agrees(cfg[key], key, token, tokens, model_dir)
    dtype = cfg.get("torch_dtype")
    return ModelSpec(arch, {k: text[k] for k in LLAMA_SETTINGS}, rope, ids, dtype if isinstance(dtype, str) else None)


def _agrees(value, key: str, token: str, tokens: dict, model_dir: Path) -> None:
    """The other family finds this token by its string: the config's id must be the tokenizer's."""
    if value != _token(tokens, token, model_dir):
        raise ConvertError(
            f"{model_dir}/config.json: {key} = {value!r}, but the tokenizer's {token} is {tokens[token]}: the "
            "other family finds the token by name, so the two must agree; fix the config or the tokenizer"
        )


def native_spec(model_dir: Path) -> ModelSpec:
    """A native config.json (+ its tokenizer's ids) as a ModelSpec."""
    where = f"{model_dir}/config.json"
    raw = _read_json(model_dir / "config.json")
    cfg = dict(NATIVE_DEFAULTS, **raw)
    if cfg["pretraining_tp"] != 1:
        raise ConvertError(f"{where}: pretraining_tp = {cfg['pretraining_tp']!r}: only 1 converts exactly")
    rows = _int(cfg, "codebook_size", where, minimum=3)
    arch = _arch(cfg, where, _int(cfg, "num_codebooks", where), rows)
    if cfg["rope_parameters"] is None and ("rope_scaling" in raw or "rope_theta" in raw):
        raise ConvertError(f"{where}: rope_scaling/rope_theta without rope_parameters: write rope_parameters")
    params = cfg["rope_parameters"] or NATIVE_DEFAULT_ROPE
    if not isinstance(params, dict):
        raise ConvertError(f"{where}: rope_parameters = {params!r} is not an object")
    rope = _rope(params.get("rope_type"), params.get("rope_theta"), params, where)
    tokens = special_token_ids(model_dir)
    for key, token in (("audio_token_id", AUDIO_OUT), ("audio_bos_token_id", AUDIO_OUT_BOS),
                       ("audio_delay_token_id", AUDIO_DELAY)):  # fmt: skip
        _agrees(cfg[key], key, token, tokens, model_dir)
    ids = dict(bos=cfg["bos_token_id"], eos=cfg["eos_token_id"], pad=cfg["pad_token_id"],
               audio_in=_token(tokens, AUDIO_IN, model_dir), audio_out=cfg["audio_token_id"],
               audio_out_bos=cfg["audio_bos_token_id"], audio_eos=_token(tokens, AUDIO_EOS, model_dir),
               audio_delay=cfg["audio_delay_token_id"],
               stream_bos=cfg["audio_stream_bos_id"], stream_eos=cfg["audio_stream_eos_id"])  # fmt: skip
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    return ModelSpec(arch, {k: cfg[k] for k in LLAMA_SETTINGS}, rope, ids, dtype if isinstance(dtype, str) else None)


# ------------------------------------------------------------------------------------------ writing configs


def _llama_fields(spec: ModelSpec) -> dict:
    a = spec.arch
    return dict(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim, attention_bias=a.attention_bias, mlp_bias=a.mlp_bias, pretraining_tp=1,
        # neither class ties text_lm_head to embed_tokens whatever this says (tested): write the native default
        tie_word_embeddings=False, **spec.llama,
    )  # fmt: skip


def native_config(spec: ModelSpec) -> dict:
    ids = spec.ids
    cfg = dict(
        _llama_fields(spec), architectures=[NATIVE_ARCH], model_type="higgs_audio_v2",
        rope_parameters=dict(spec.rope), bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        num_codebooks=spec.arch.num_codebooks, codebook_size=spec.arch.codebook_rows, audio_token_id=ids["audio_out"],
        audio_bos_token_id=ids["audio_out_bos"], audio_delay_token_id=ids["audio_delay"],
        audio_stream_bos_id=ids["stream_bos"], audio_stream_eos_id=ids["stream_eos"],
        transformers_version=NATIVE_VERSION,
    )  # fmt: skip
    if spec.dtype:
        cfg["dtype"] = spec.dtype
    return cfg


def boson_config(spec: ModelSpec) -> dict:
    """boson's config.json, laid out as revision 10840182's (the released architecture's settings)."""
    ids, arch = spec.ids, spec.arch
    rope = dict(spec.rope)
    theta = rope.pop("rope_theta")
    text = dict(_llama_fields(spec), model_type="llama", rope_theta=theta,
                rope_scaling=None if rope["rope_type"] == "default" else rope,
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])  # fmt: skip
    cfg = dict(
        architectures=[BOSON_ARCH], model_type="higgs_audio", text_config=text, hidden_size=arch.hidden_size,
        audio_adapter_type="dual_ffn_fast_forward", audio_dual_ffn_layers=list(range(arch.num_layers)),
        audio_ffn_hidden_size=arch.hidden_size, audio_ffn_intermediate_size=arch.intermediate_size,
        **{key: value for key, (value, _) in BOSON_REQUIRED.items()},
        audio_num_codebooks=arch.num_codebooks, audio_codebook_size=arch.codebook_rows - 2,
        audio_stream_bos_id=ids["stream_bos"], audio_stream_eos_id=ids["stream_eos"],
        audio_in_token_idx=ids["audio_in"], audio_out_token_idx=ids["audio_out"],
        audio_out_bos_token_id=ids["audio_out_bos"], audio_eos_token_id=ids["audio_eos"], pad_token_id=ids["pad"],
        audio_bos_token="<|audio_bos|>", audio_eos_token=AUDIO_EOS, audio_out_bos_token=AUDIO_OUT_BOS,
        audio_in_token=AUDIO_IN, audio_out_token=AUDIO_OUT, audio_tokenizer_config=None,
        transformers_version=BOSON_VERSION,
    )  # fmt: skip
    if spec.dtype:
        cfg["torch_dtype"] = spec.dtype
    return cfg


def boson_generation_config(spec: ModelSpec) -> dict:
    """What boson's save_pretrained writes beside the weights (a generation config from the model config)."""
    ids = spec.ids
    return {"_from_model_config": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"], "transformers_version": BOSON_VERSION}  # fmt: skip


def boson_tokenizer_config(config: dict) -> dict:
    """A transformers 5 tokenizer_config.json in the form transformers 4.46 reads (the tokenizer itself,
    tokenizer.json, is copied as it is): its class under the name 4.46 knows (5's TokenizersBackend is 4.46's
    PreTrainedTokenizerFast), the special-token list under 4.46's key, no processor (boson has none)."""
    config = {k: v for k, v in config.items() if k not in ("backend", "processor_class", "auto_map")}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list) and "additional_special_tokens" not in config:
        config["additional_special_tokens"] = extra
    config.setdefault("clean_up_tokenization_spaces", False)  # transformers 5's behaviour, and the release's
    return config


# ------------------------------------------------------------------------------------------ the weights


@dataclass(frozen=True)
class Move:
    """One output tensor: its name, and the source keys whose rows make it (one, or a frozen+trainable pair)."""

    dst: str
    src: tuple[str, ...]
    file: str  # the source file of src[0]: output shards follow the source's


def _halves(key: str) -> list[tuple[str, str]]:
    base = key.removesuffix(".weight")
    return [(f"{base}.{a}.weight", f"{base}.{b}.weight") for a, b in HALVES] if key.endswith(".weight") else []


def plan_moves(model_dir: Path, headers: dict[str, TensorHeader], table: dict[str, tuple[str, tuple]],
               dropped: re.Pattern, halves: bool) -> list[Move]:  # fmt: skip
    """Match every source tensor to the table (src key -> (dst key, shape)); refuse whatever does not fit."""
    found: dict[str, tuple] = {}  # table key -> shape as the checkpoint holds it
    moves, used = [], set()
    for key, (dst, shape) in table.items():
        pair = next((p for p in (_halves(key) if halves else []) if p[0] in headers and p[1] in headers), None)
        if key in headers or pair is None:
            if key in headers:
                found[key] = headers[key].shape
                moves.append(Move(dst, (key,), headers[key].file))
                used.add(key)
            continue
        first, second = headers[pair[0]], headers[pair[1]]
        if first.dtype != second.dtype:
            raise ConvertError(
                f"{model_dir}: {pair[0]} is {first.dtype} and {pair[1]} is {second.dtype}: joining the halves "
                f"of {key} would change a dtype; save both halves in one dtype"
            )
        if len(first.shape) != 2 or first.shape[1:] != second.shape[1:]:
            raise ConvertError(f"{model_dir}: {pair[0]} {list(first.shape)} and {pair[1]} {list(second.shape)} "
                               f"are not two row blocks of {key} {list(shape)}")  # fmt: skip
        found[key] = (first.shape[0] + second.shape[0], *first.shape[1:])
        moves.append(Move(dst, pair, first.file))
        used.update(pair)
    leftover = {k: h.shape for k, h in headers.items() if k not in used and not dropped.fullmatch(k)}
    problem = mismatch_message({**found, **leftover}, {k: shape for k, (_, shape) in table.items()})
    if problem:
        raise ConvertError(f"{model_dir}: its weights cannot be converted exactly ({problem})")
    return moves


def _shard_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_weights(
    model_dir: Path, headers: dict[str, TensorHeader], moves: list[Move], sharded: bool, out: Path
) -> dict[str, str]:
    """Write the moved tensors, one output shard per source file; the index too when the source had one.
    Returns dst key -> output file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted({m.file for m in moves})
    names = _shard_names(len(files)) if sharded or len(files) > 1 else [SINGLE_FILE]
    if len(names) == 1 and sharded:  # a one-shard index stays an index: the layout the source had
        names = ["model-00001-of-00001.safetensors"]
    weight_map, total = {}, 0
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def tensor(key: str, file: str):
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(model_dir / file), framework="pt"))
            return handles[file].get_tensor(key)

        for file, name in zip(files, names):
            tensors = {}
            for move in (m for m in moves if m.file == file):
                parts = [tensor(k, headers[k].file) for k in move.src]
                tensors[move.dst] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                weight_map[move.dst] = name
                total += tensors[move.dst].numel() * tensors[move.dst].element_size()
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            del tensors
    if len(names) > 1 or sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


# ------------------------------------------------------------------------------------------ the whole conversion


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _copy_file(src: Path, dst: Path) -> None:
    """A regular file of the model directory (a Hugging Face cache snapshot's link into its blobs is one)."""
    real = model_file(src, ConvertError)
    if real is None:
        raise ConvertError(f"{src} does not exist")
    shutil.copyfile(real, dst)


def _check_out(src: Path, out: Path) -> None:
    real_src = Path(os.path.realpath(src))
    if out == real_src or out.is_relative_to(real_src) or real_src.is_relative_to(out):
        raise ConvertError(f"--out {out} is, lies inside or contains the model {src}: pass a folder beside it")
    if os.path.lexists(out) and (not out.is_dir() or out.is_symlink() or any(os.scandir(out))):
        raise ConvertError(
            f"--out {out} exists and is not an empty folder: convert never writes into or replaces one; "
            "pass a new folder"
        )


def build_new_folder(out: Path, tag: str, build):
    """`build(tmp)` into a fresh hidden folder beside `out`, fsynced, then renamed to `out` (new or empty);
    on any failure only that folder is removed. Returns what `build` returned."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{tag}.{os.getpid()}.{secrets.token_hex(8)}")
    tmp.mkdir()
    try:
        result = build(tmp)
        fsync_tree(tmp)
        try:
            os.rename(tmp, out)  # onto nothing or an empty folder; fails if the folder filled meanwhile
        except OSError as err:
            raise ConvertError(f"--out {out} could not be created ({err}): pass a new folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the folder this call made
        raise
    fsync_dir(out.parent)
    return result


def _native_extras(src: Path, tmp: Path) -> None:
    """The processor, chat template and generation config a native directory holds (helper B's layout)."""
    try:
        from higgs_ds.models.native.layout import write_native_extras
    except ImportError as err:  # the native environment's module: transformers 5's processor classes
        raise ConvertError(
            f"converting to native writes the processor files, which needs the native environment "
            f"(.venv, transformers 5): run `higgs-ds convert` there ({err})"
        ) from None
    from transformers import PreTrainedTokenizerFast  # the Llama-3 tokenizer's class; no class named by the files

    write_native_extras(tmp, PreTrainedTokenizerFast.from_pretrained(str(src)))


def _build(src: Path, family: str, to: str, tmp: Path) -> list[str]:
    """Write the converted directory into the empty folder `tmp`; returns the source files not carried."""
    spec = boson_spec(src) if family == BOSON else native_spec(src)
    src_col, dst_col = (0, 1) if family == BOSON else (1, 0)
    table = {row[src_col]: (row[dst_col], row[2]) for row in weight_table(spec.arch)}
    headers = read_headers(src)
    moves = plan_moves(src, headers, table, BOSON_DROPPED if family == BOSON else NATIVE_DROPPED, family == BOSON)
    write_weights(src, headers, moves, (src / INDEX_FILE).is_file(), tmp)
    out_headers = check_state_dict_matches(tmp, expected_shapes(spec.arch, to), f"the {to} class")
    for move in moves:  # bit-exact copies keep their dtype; checked on what was written, not on the plan
        if out_headers[move.dst].dtype != headers[move.src[0]].dtype:
            raise ConvertError(f"{src}: {move.src[0]} would change dtype in the conversion")
    carried = [n for n in TOKENIZER_FILES + CARRIED_FILES if (src / n).is_file()]
    for name in carried:
        _copy_file(src / name, tmp / name)
    if to == BOSON and "tokenizer_config.json" in carried:
        _write_json(tmp / "tokenizer_config.json", boson_tokenizer_config(_read_json(src / "tokenizer_config.json")))
    if to == NATIVE:
        _write_json(tmp / "config.json", native_config(spec))
        _native_extras(src, tmp)
    else:
        _write_json(tmp / "config.json", boson_config(spec))
        _write_json(tmp / "generation_config.json", boson_generation_config(spec))
    used = {h.file for h in headers.values()} | {INDEX_FILE, "config.json", "generation_config.json", *carried}
    return sorted(p.name for p in src.iterdir() if p.name not in used)


def _source_family(src: Path) -> str | None:
    """The model family of `src`, or None when it is a codec directory."""
    try:
        return model_family(src)
    except FamilyError as err:
        try:
            codec_family(src)
        except FamilyError:
            raise err from None
        return None


def convert_model(src_dir: str | os.PathLike, to: str, out_dir: str | os.PathLike) -> Path:
    """Convert the model (or codec) directory `src_dir` to the `to` family ("native" | "boson") at `out_dir`."""
    from higgs_ds.models.trust import check_model_dir

    if to not in FAMILIES:
        raise ConvertError(f"{src_dir}: --to {to!r}: choose one of {', '.join(FAMILIES)}")
    if (Path(src_dir) / "adapter_config.json").is_file() and not (Path(src_dir) / "config.json").is_file():
        raise ConvertError(
            f"{src_dir} holds LoRA adapters, not a model: merge them into their base first "
            "(`higgs-ds export CHECKPOINT --merge-lora --out DIR`), then convert DIR"
        )
    src = check_model_dir(src_dir)  # a directory of data only (no Python files, no auto_map)
    if (src / "config.json").is_file() and json.loads((src / "config.json").read_text()).get("model_type") == (
        "higgs_multimodal_qwen3"
    ):
        raise ConvertError(
            f"{src} is a Higgs TTS 3 model: it has one format (the released one) and does not convert into "
            "Higgs-Audio v2; train it as it is (the default environment)"
        )
    family = _source_family(src)
    if family is None:  # a codec directory: its own format and converter
        try:
            from higgs_ds.models.convert_codec import convert_codec
        except ModuleNotFoundError as err:
            if err.name != "higgs_ds.models.convert_codec":
                raise
            raise ConvertError(f"{src}: a codec directory, and this higgs-ds cannot convert codecs") from None
        return convert_codec(src_dir, to, out_dir)
    if family == to:
        raise ConvertError(f"{src} is already a {to}-format model: nothing to convert")
    out = Path(os.path.realpath(out_dir))
    _check_out(src, out)
    left = build_new_folder(out, "convert", lambda tmp: _build(src, family, to, tmp))
    if left:
        print(f"higgs-ds: note: not carried over from {src}: {', '.join(left)}", file=sys.stderr)
    return out
