"""Converting a Higgs-Audio v2 codec directory between boson's format and transformers' native one.

    higgs-ds convert CODEC_DIR --to native|boson --out OUT
    convert_codec(src_dir, "native" | "boson", out_dir) -> Path

- boson: `config.json` (HiggsAudioTokenizer constructor arguments, no model_type) + `model.pth` (its state
  dict, read with torch.load(weights_only=True) only) + `semantic_teacher/config.json` (the HuBERT teacher's
  HubertConfig; absent: HuBERT-base). Revision 9d4988fb of bosonai/higgs-audio-v2-tokenizer, and
  higgs_ds.shards.codec's tiny codec in the boson environment.
- native: `config.json` (HiggsAudioV2TokenizerConfig, model_type "higgs_audio_v2_tokenizer", the teacher in
  `semantic_model_config`) + `model.safetensors` + `preprocessor_config.json` (the DacFeatureExtractor's
  settings), as Boson's `main` since April 2026 holds.

Both classes hold the same modules under other names (the table is `module_table`; checked against both
real classes by tests/test_codec_convert.py):

    boson                                          native
    encoder.block.0 / .S+1 / .S+2                  acoustic_encoder.conv1 / snake1 / conv2
    encoder.block.B.block.U.block.L  (U 0-2)       acoustic_encoder.block.B-1.res_unitU+1.{snake1,conv1,snake2,conv2}[L]
    encoder.block.B.block.3 / .4                   acoustic_encoder.block.B-1.snake1 / conv1
    decoder_2.model.0 / .S+1 / .S+2                acoustic_decoder.conv1 / snake1 / conv2
    decoder_2.model.B.block.0 / .1                 acoustic_decoder.block.B-1.snake1 / conv_t1
    decoder_2.model.B.block.U.block.L  (U 2-4)     acoustic_decoder.block.B-1.res_unitU-1.{...}[L]
    quantizer.vq.layers.I._codebook / project_*    quantizer.quantizers.I.codebook / project_*
    fc_prior / fc_post1 / fc_post2                 fc / fc1 / fc2
    {en,de}coder_semantic.*.conv.conv  (wrapped)   {en,de}coder_semantic.*.conv
    semantic_model.*                               semantic_model.*  (the same transformers HubertModel)

(S = len(ratios) strides.) boson's DAC convolutions are weight-normed (`weight_g`, `weight_v`, computed into
the weight at every forward); native's are plain. To native the weight is folded with the very function
boson's forward uses (torch._weight_norm), so it is bit for bit the weight boson convolves with. To boson
the weight w is stored as v = w and g = the norm torch's own weight-norm kernel computes for w, so boson's
forward computes v * (g / ||v||) = w * 1.0 = w exactly. So native -> boson -> native gives back every tensor
bit for bit; boson -> native -> boson gives back every other tensor bit for bit and every convolution's
effective weight bit for bit, but not the stored (g, v) pair (weight norm is not unique: v may be scaled
freely; the original v's scale is not kept). Exact on the CPU, where convert runs; a GPU's weight-norm
kernel may round differently when boson's class recomputes the weight there.

Only data is read and no model class is needed, so a codec converts in either environment; where this
environment has one of the two classes (transformers' native class in the default one, boson's in the
boson one), the source or the output is also checked against it (names and shapes, built on the meta
device). Refused, with a UserError naming the directory and the key or setting: an unknown or unmappable
key, a missing weight, half of a weight-norm pair, a setting one class cannot express (boson fixes the DAC
widths, the semantic encoder and a 768-wide HuBERT teacher), an existing non-empty --out. The output is
built in a temp folder beside --out and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from higgs_ds.models.convert import ConvertError, _check_out, build_new_folder
from higgs_ds.models.family import BOSON, FAMILIES, NATIVE, FamilyError, codec_family

CONFIG_FILE, BOSON_WEIGHTS, NATIVE_WEIGHTS = "config.json", "model.pth", "model.safetensors"
TEACHER_CONFIG = Path("semantic_teacher") / "config.json"
PREPROCESSOR_FILE, MARKER_FILE = "preprocessor_config.json", "higgs_ds_codec.json"
NATIVE_CODEC_TYPE, NATIVE_CLASS = "higgs_audio_v2_tokenizer", "HiggsAudioV2TokenizerModel"

# HiggsAudioTokenizer's constructor defaults (boson_multimodal 0.1.1), for keys a config.json leaves out.
BOSON_DEFAULTS = {
    "n_filters": 32,
    "D": 128,
    "target_bandwidths": [1, 1.5, 2, 4, 6],
    "ratios": [8, 5, 4, 2],
    "sample_rate": 16000,
    "bins": 1024,
    "n_q": 8,
    "codebook_dim": None,
    "normalize": False,
    "causal": False,
    "semantic_techer": "hubert_base_general",
    "last_layer_semantic": True,
    "merge_mode": "concat",
    "downsample_mode": "step_down",
    "semantic_mode": "classic",
    "vq_scale": 1,
    "semantic_sample_rate": None,
}
# Settings the native class has no counterpart for: only these values convert.
BOSON_FIXED = {"merge_mode": "concat", "downsample_mode": "step_down", "vq_scale": 1}
HUBERT_TEACHERS = ("hubert_base", "hubert_base_general")  # the teachers HuBERT's class computes
# What boson's HiggsAudioTokenizer hard-codes and the native config spells out.
BOSON_DAC = {"encoder_hidden_size": 64, "decoder_hidden_size": 1024}
BOSON_SEMANTIC = {
    "kernel_size": 3,
    "strides": [1, 1],
    "channel_ratios": [1, 1],
    "block_dilations": [1, 1],
    "unit_kernel_size": 3,
    "downsample_factor": 320,
}
TEACHER_WIDTH = 768  # boson's semantic_dim
HUBERT_MASK_TIME_PROB = 0.05  # HubertConfig's default, which boson's teacher gets; native's default is 0.0
# HiggsAudioV2TokenizerConfig's defaults (transformers 5.19) for keys a native config.json leaves out.
NATIVE_DEFAULTS = {
    "target_bandwidths": [0.5, 1, 1.5, 2, 4],
    "sample_rate": 24000,
    "codebook_size": 1024,
    "codebook_dim": 64,
    "semantic_sample_rate": 16000,
    **BOSON_SEMANTIC,
}
NATIVE_ACOUSTIC_DEFAULTS = {
    "encoder_hidden_size": 64,
    "downsampling_ratios": [8, 5, 4, 2],
    "decoder_hidden_size": 1024,
    "upsampling_ratios": [8, 5, 4, 2],
    "hidden_size": 256,
}
# The DacFeatureExtractor settings of the released native codec (hop = one 25 Hz frame at 24 kHz).
FEATURE_EXTRACTOR = {
    "feature_extractor_type": "DacFeatureExtractor",
    "feature_size": 1,
    "hop_length": 960,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}
# Keys of a HubertConfig dict that say how it was saved, not what the teacher computes.
CONFIG_BOOKKEEPING = ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path")

# ------------------------------------------------------------------------------------------ the key table

UNIT_LAYERS = ("snake1", "conv1", "snake2", "conv2")  # boson's ResidualUnit: Sequential(Snake, WNConv, Snake, WNConv)
# kind -> (boson's parameter names, native's); "wn" is a weight-normed DAC convolution.
KINDS = {
    "wn": (("weight_g", "weight_v", "bias"), ("weight", "bias")),
    "snake": (("alpha",), ("alpha",)),
    "linear": (("weight", "bias"), ("weight", "bias")),
    "codebook": (("inited", "cluster_size", "embed", "embed_avg"),) * 2,
    "conv": (("weight",), ("weight",)),
    "conv_bias": (("weight", "bias"), ("weight", "bias")),
}


def _unit(boson: str, native: str) -> list[tuple[str, str, str]]:
    """A DAC residual unit: Snake, conv(7), Snake, conv(1)."""
    return [
        (f"{boson}.block.{i}", f"{native}.{name}", "snake" if name.startswith("snake") else "wn")
        for i, name in enumerate(UNIT_LAYERS)
    ]


def _acoustic(strides: int) -> list[tuple[str, str, str]]:
    rows = [("encoder.block.0", "acoustic_encoder.conv1", "wn"), ("decoder_2.model.0", "acoustic_decoder.conv1", "wn")]
    for b in range(strides):
        enc, dec = f"encoder.block.{b + 1}.block", f"decoder_2.model.{b + 1}.block"
        for u in range(3):
            rows += _unit(f"{enc}.{u}", f"acoustic_encoder.block.{b}.res_unit{u + 1}")
            rows += _unit(f"{dec}.{u + 2}", f"acoustic_decoder.block.{b}.res_unit{u + 1}")
        rows += [(f"{enc}.3", f"acoustic_encoder.block.{b}.snake1", "snake")]
        rows += [(f"{enc}.4", f"acoustic_encoder.block.{b}.conv1", "wn")]
        rows += [(f"{dec}.0", f"acoustic_decoder.block.{b}.snake1", "snake")]
        rows += [(f"{dec}.1", f"acoustic_decoder.block.{b}.conv_t1", "wn")]
    for boson, native in (("encoder.block", "acoustic_encoder"), ("decoder_2.model", "acoustic_decoder")):
        rows += [(f"{boson}.{strides + 1}", f"{native}.snake1", "snake")]
        rows += [(f"{boson}.{strides + 2}", f"{native}.conv2", "wn")]
    return rows


def _semantic(blocks: int, units: int) -> list[tuple[str, str, str]]:
    """The semantic encoder and decoder: boson wraps each nn.Conv1d in a module holding it as `.conv`,
    except the residual units' 1x1 conv2."""
    rows = [
        ("encoder_semantic.conv.conv", "encoder_semantic.conv", "conv"),
        ("decoder_semantic.conv1.conv", "decoder_semantic.conv1", "conv"),
        ("decoder_semantic.conv2.conv", "decoder_semantic.conv2", "conv"),
    ]
    for side in ("encoder_semantic", "decoder_semantic"):
        for i in range(blocks):
            block = f"{side}.conv_blocks.{i}"
            rows += [(f"{block}.conv.conv", f"{block}.conv", "conv_bias")]
            for j in range(units):
                rows += [(f"{block}.res_units.{j}.conv1.conv", f"{block}.res_units.{j}.conv1", "conv")]
                rows += [(f"{block}.res_units.{j}.conv2", f"{block}.res_units.{j}.conv2", "conv")]
    return rows


def module_table(strides: int, quantizers: int, blocks: int = 2, units: int = 2) -> list[tuple[str, str, str]]:
    """(boson module, native module, kind) for every module but the HuBERT teacher (`semantic_model.*`,
    the same transformers class and names in both)."""
    rows = _acoustic(strides) + _semantic(blocks, units)
    rows += [("fc_prior", "fc", "linear"), ("fc_post1", "fc1", "linear"), ("fc_post2", "fc2", "linear")]
    for i in range(quantizers):
        boson, native = f"quantizer.vq.layers.{i}", f"quantizer.quantizers.{i}"
        rows += [(f"{boson}._codebook", f"{native}.codebook", "codebook")]
        rows += [(f"{boson}.project_in", f"{native}.project_in", "linear")]
        rows += [(f"{boson}.project_out", f"{native}.project_out", "linear")]
    return rows


TEACHER_PREFIX = "semantic_model."

# ------------------------------------------------------------------------------------------ the configs


def _refuse(where, key: str, value, why: str) -> ConvertError:
    return ConvertError(f"{where}: {key} = {json.dumps(value)}: {why}; this codec cannot be converted")


def _frame_rate(sample_rate: int, ratios: list[int]) -> int:
    return math.ceil(sample_rate / math.prod(ratios))


def native_quantizers(bandwidths: list, sample_rate: int, ratios: list[int], codebook_size: int) -> int:
    """HiggsAudioV2TokenizerConfig.num_quantizers: what the largest target bandwidth allows."""
    bits = math.ceil(math.log2(codebook_size))
    return int(1000 * bandwidths[-1] // (_frame_rate(sample_rate, ratios) * bits))


def _native_bandwidths(boson_bandwidths: list, n_q: int, rate: int, bits: int) -> list:
    """boson encodes with all n_q quantizers (bandwidth None); native with as many as its largest target
    bandwidth allows: the list is cut to end at n_q quantizers' bandwidth."""
    top = n_q * bits * rate / 1000
    return [b for b in boson_bandwidths if b < top] + [int(top) if float(top).is_integer() else top]


def _check_boson_config(cfg: dict, where) -> None:
    unknown = sorted(set(cfg) - set(BOSON_DEFAULTS))
    if unknown:
        raise _refuse(where, unknown[0], cfg[unknown[0]], "not a HiggsAudioTokenizer argument")
    get = {key: cfg.get(key, default) for key, default in BOSON_DEFAULTS.items()}
    for key, value in BOSON_FIXED.items():
        if get[key] != value:
            raise _refuse(where, key, get[key], f"the native class computes only {json.dumps(value)}")
    if get["semantic_techer"] not in HUBERT_TEACHERS:
        raise _refuse(where, "semantic_techer", get["semantic_techer"], f"the native class has only {HUBERT_TEACHERS}")
    if not isinstance(get["bins"], int) or isinstance(get["bins"], bool):
        raise _refuse(where, "bins", get["bins"], "finite scalar quantization (RFSQ) has no native class")
    if get["codebook_dim"] is None:
        raise _refuse(where, "codebook_dim", None, "codebooks without a projection have no native class")


def _check_teacher(teacher: dict, where) -> None:
    if teacher.get("model_type", "hubert") != "hubert":
        raise _refuse(where, "model_type", teacher["model_type"], "boson's codec builds a HuBERT teacher")
    if teacher.get("hidden_size", TEACHER_WIDTH) != TEACHER_WIDTH:
        raise _refuse(where, "hidden_size", teacher["hidden_size"], f"boson's codec fixes it to {TEACHER_WIDTH}")
    if teacher.get("conv_pos_batch_norm", False):
        raise _refuse(where, "conv_pos_batch_norm", True, "transformers 4.46's HuBERT has no such layer")


def native_config(boson: dict, teacher: dict, where="codec") -> dict:
    """boson's config.json (+ the teacher's HubertConfig dict) -> native config.json."""
    _check_boson_config(boson, where)
    _check_teacher(teacher, where)
    get = {key: boson.get(key, default) for key, default in BOSON_DEFAULTS.items()}
    _check_geometry(get["sample_rate"], get["ratios"], get["target_bandwidths"], get["bins"], where)
    for key in ("D", "codebook_dim", "n_q"):
        _positive_int(get[key], key, where)
    rate, bits = _frame_rate(get["sample_rate"], get["ratios"]), math.ceil(math.log2(get["bins"]))
    semantic = {"model_type": "hubert", "mask_time_prob": HUBERT_MASK_TIME_PROB}
    semantic.update({k: v for k, v in teacher.items() if k not in CONFIG_BOOKKEEPING})
    config = {
        "architectures": [NATIVE_CLASS],
        "model_type": NATIVE_CODEC_TYPE,
        "sample_rate": get["sample_rate"],
        "codebook_size": get["bins"],
        "codebook_dim": get["codebook_dim"],
        "target_bandwidths": _native_bandwidths(get["target_bandwidths"], get["n_q"], rate, bits),
        "semantic_sample_rate": get["semantic_sample_rate"] or 16000,
        **BOSON_SEMANTIC,
        "acoustic_model_config": {
            "model_type": "dac",
            **BOSON_DAC,
            "hidden_size": get["D"],
            "downsampling_ratios": list(get["ratios"]),
            "upsampling_ratios": list(get["ratios"]),
        },
        "semantic_model_config": semantic,
    }
    quantizers = native_quantizers(config["target_bandwidths"], get["sample_rate"], get["ratios"], get["bins"])
    if quantizers != get["n_q"]:
        raise _refuse(where, "target_bandwidths", get["target_bandwidths"], f"no bandwidth gives n_q={get['n_q']}")
    return config


def _native_settings(cfg: dict, where) -> tuple[dict, dict, dict]:
    """(settings, acoustic settings, teacher dict) of a native config.json, with the class's defaults."""
    if not isinstance(cfg.get("acoustic_model_config", {}), dict):
        raise _refuse(where, "acoustic_model_config", None, "not a JSON object")
    if not isinstance(cfg.get("semantic_model_config", {}), dict):
        raise _refuse(where, "semantic_model_config", None, "not a JSON object")
    get = {key: cfg.get(key, default) for key, default in NATIVE_DEFAULTS.items()}
    acoustic = dict(NATIVE_ACOUSTIC_DEFAULTS, **(cfg.get("acoustic_model_config") or {}))
    semantic = cfg.get("semantic_model_config")
    # HiggsAudioV2TokenizerConfig.__post_init__: no teacher config is HubertConfig() (mask_time_prob 0.05);
    # a dict gets mask_time_prob 0.0 where it has none
    teacher = {} if semantic is None else {"mask_time_prob": 0.0, **semantic}
    return get, acoustic, teacher


def boson_config(native: dict, where="codec") -> tuple[dict, dict]:
    """native config.json -> (boson's config.json, the teacher's semantic_teacher/config.json)."""
    get, acoustic, teacher = _native_settings(native, where)
    for key, value in BOSON_SEMANTIC.items():
        if get[key] != value:
            raise _refuse(where, key, get[key], f"boson's semantic encoder fixes it to {json.dumps(value)}")
    for key, value in BOSON_DAC.items():
        if acoustic[key] != value:
            raise _refuse(where, f"acoustic_model_config.{key}", acoustic[key], f"boson's DAC fixes it to {value}")
    if list(acoustic["upsampling_ratios"]) != list(acoustic["downsampling_ratios"]):
        why = "boson's DAC decoder upsamples by its downsampling ratios"
        raise _refuse(where, "acoustic_model_config.upsampling_ratios", acoustic["upsampling_ratios"], why)
    if get["codebook_dim"] is None:
        raise _refuse(where, "codebook_dim", None, "boson's quantizer needs a codebook width")
    _check_teacher(teacher, where)
    ratios = acoustic["downsampling_ratios"]
    _check_geometry(get["sample_rate"], ratios, get["target_bandwidths"], get["codebook_size"], where)
    _positive_int(acoustic["hidden_size"], "acoustic_model_config.hidden_size", where)
    _positive_int(get["codebook_dim"], "codebook_dim", where)
    ratios = list(acoustic["downsampling_ratios"])
    boson = {
        "n_filters": BOSON_DEFAULTS["n_filters"],
        "D": acoustic["hidden_size"],
        "codebook_dim": get["codebook_dim"],
        "target_bandwidths": list(get["target_bandwidths"]),
        "ratios": ratios,
        "sample_rate": get["sample_rate"],
        "bins": get["codebook_size"],
        "n_q": native_quantizers(get["target_bandwidths"], get["sample_rate"], ratios, get["codebook_size"]),
        "semantic_techer": BOSON_DEFAULTS["semantic_techer"],
    }
    if get["semantic_sample_rate"] != 16000:
        boson["semantic_sample_rate"] = get["semantic_sample_rate"]
    return boson, {k: v for k, v in teacher.items() if k not in CONFIG_BOOKKEEPING}


def _positive_int(value, key: str, where) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(where, key, value, "must be a positive integer")
    return value


def _check_geometry(sample_rate, ratios, bandwidths, codebook_size, where) -> None:
    """The settings the key table and the quantizer count are computed from, as the classes need them."""
    _positive_int(sample_rate, "sample_rate", where)
    _positive_int(codebook_size, "codebook_size / bins", where)
    if not isinstance(ratios, list) or not ratios:
        raise _refuse(where, "ratios / downsampling_ratios", ratios, "must be a list of positive integers")
    for r in ratios:
        _positive_int(r, "ratios / downsampling_ratios", where)
    numbers = isinstance(bandwidths, list) and bandwidths
    if not numbers or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in bandwidths):
        raise _refuse(where, "target_bandwidths", bandwidths, "must be a list of positive numbers")


# ------------------------------------------------------------------------------------------ the tensors


def fold_weight_norm(g, v):
    """The weight boson's WNConv1d convolves with: torch.nn.utils.weight_norm (dim 0) computes it with this
    very function before every forward, so the result is bit for bit that weight."""
    import torch

    return torch._weight_norm(v, g, 0)


def unfold_weight_norm(w):
    """(g, v) whose fold_weight_norm is w exactly: v = w and g = the norm torch's weight-norm kernel
    computes for v, so g / ||v|| is 1.0 and v * 1.0 is v."""
    import torch

    _, norm = torch._weight_norm_interface(w, torch.ones((w.shape[0],) + (1,) * (w.dim() - 1), dtype=w.dtype), 0)
    return norm.reshape((w.shape[0],) + (1,) * (w.dim() - 1)).clone(), w.clone()


def _shown(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _modules(table, source: str) -> dict[str, tuple[str, str]]:
    """source module -> (target module, kind), for source 'boson' or 'native'."""
    if source == BOSON:
        return {boson: (native, kind) for boson, native, kind in table}
    return {native: (boson, kind) for boson, native, kind in table}


def _group(tensors: dict, table, source: str, where) -> dict[str, dict]:
    """The source tensors by table module ({module: {param: tensor}}); the teacher's under TEACHER_PREFIX.
    A key of no module in the table, a parameter the module does not have, or a missing one is refused."""
    modules, side = _modules(table, source), 0 if source == BOSON else 1
    grouped: dict[str, dict] = {module: {} for module in modules}
    unknown = []
    for key, tensor in tensors.items():
        if key.startswith(TEACHER_PREFIX):
            grouped.setdefault(TEACHER_PREFIX, {})[key] = tensor
            continue
        module, _, param = key.rpartition(".")
        if module in modules and param in KINDS[modules[module][1]][side]:
            grouped[module][param] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConvertError(
            f"{where}: weights no {source}-format codec holds: {_shown(unknown)}; this codec cannot be converted"
        )
    missing = [f"{m}.{p}" for m, (_, kind) in modules.items() for p in KINDS[kind][side] if p not in grouped[m]]
    if missing:
        raise ConvertError(
            f"{where}: missing weights {_shown(missing)}: the checkpoint is incomplete; download it again"
        )
    return grouped


def boson_to_native_tensors(tensors: dict, table, where) -> dict:
    out = {}
    grouped = _group(tensors, table, BOSON, where)
    out.update(grouped.pop(TEACHER_PREFIX, {}))
    modules = _modules(table, BOSON)
    for module, params in grouped.items():
        native, kind = modules[module]
        if kind == "wn":
            out[f"{native}.weight"] = fold_weight_norm(params["weight_g"], params["weight_v"])
            out[f"{native}.bias"] = params["bias"]
        else:
            out.update({f"{native}.{p}": t for p, t in params.items()})
    return out


def native_to_boson_tensors(tensors: dict, table, where) -> dict:
    out = {}
    grouped = _group(tensors, table, NATIVE, where)
    out.update(grouped.pop(TEACHER_PREFIX, {}))
    modules = _modules(table, NATIVE)
    for module, params in grouped.items():
        boson, kind = modules[module]
        if kind == "wn":
            out[f"{boson}.weight_g"], out[f"{boson}.weight_v"] = unfold_weight_norm(params["weight"])
            out[f"{boson}.bias"] = params["bias"]
        else:
            out.update({f"{boson}.{p}": t for p, t in params.items()})
    return out


def _table_for_boson(config: dict) -> list:
    ratios = config.get("ratios", BOSON_DEFAULTS["ratios"])
    return module_table(len(ratios), config.get("n_q", BOSON_DEFAULTS["n_q"]))


def _table_for_native(config: dict) -> list:
    get, acoustic, _ = _native_settings(config, "config.json")
    ratios = list(acoustic["downsampling_ratios"])
    quantizers = native_quantizers(get["target_bandwidths"], get["sample_rate"], ratios, get["codebook_size"])
    return module_table(len(ratios), quantizers, len(get["channel_ratios"]), len(get["block_dilations"]))


# ------------------------------------------------------------------------------------------ the real classes


def native_class_shapes(config: dict) -> dict[str, tuple] | None:
    """Names and shapes of HiggsAudioV2TokenizerModel(config) (built on the meta device: no memory, no
    init), or None where this environment has no such class (transformers < 5.3: the boson environment)."""
    import torch

    try:
        from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel
    except ImportError:
        return None
    with torch.device("meta"):
        model = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig.from_dict(config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def boson_class_shapes(config: dict, teacher: dict) -> dict[str, tuple] | None:
    """Names and shapes of boson's HiggsAudioTokenizer(**config) with the teacher built from `teacher`
    (meta device), or None where boson_multimodal is not installed (the native environment)."""
    import torch

    from higgs_ds.models.family import environment_family

    if environment_family() != BOSON:
        return None
    from higgs_ds.shards.codec import _construct

    with torch.device("meta"):
        model = _construct(config, teacher, "cpu")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(tensors: dict, expected: dict | None, what: str, where) -> None:
    from higgs_ds.models.strict import mismatch_message

    if expected is None:
        return
    problem = mismatch_message({k: tuple(t.shape) for k, t in tensors.items()}, expected)
    if problem:
        raise ConvertError(
            f"{where}: the weights are not the ones {what} expects ({problem}); this codec cannot be converted"
        )


# ------------------------------------------------------------------------------------------ files


def _read_json_object(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: not readable JSON ({err}): restore the codec's {what}") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: not a JSON object: restore the codec's {what}")
    return value


def _tensor_dict(value, path: Path) -> dict:
    import torch

    if not isinstance(value, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
        raise ConvertError(f"{path}: not a state dict of named tensors: download the codec's {path.name} again")
    return value


def read_boson_config(src: Path) -> tuple[dict, dict]:
    """(config.json, the teacher's HubertConfig dict; {}: HuBERT-base) of a boson-format codec."""
    config = _read_json_object(src / CONFIG_FILE, "config.json")
    teacher_path = src / TEACHER_CONFIG
    return config, _read_json_object(teacher_path, "teacher config") if teacher_path.is_file() else {}


def read_boson_weights(src: Path) -> dict:
    """model.pth through torch.load(weights_only=True), which unpickles tensors and plain containers only."""
    import torch

    try:
        state = torch.load(src / BOSON_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as err:  # a broken or hostile pickle: whatever it raises, it is the file's fault
        raise ConvertError(
            f"{src / BOSON_WEIGHTS}: not a loadable weights-only checkpoint ({type(err).__name__}: "
            f"{str(err)[:200]}): download it again"
        ) from None
    return _tensor_dict(state, src / BOSON_WEIGHTS)


def read_native_weights(src: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = src / NATIVE_WEIGHTS
    if not path.is_file():
        raise ConvertError(
            f"{src}: no {NATIVE_WEIGHTS}: a native codec directory holds config.json and {NATIVE_WEIGHTS}"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConvertError(f"{path}: not a readable safetensors file ({err}): download it again") from None


def _marker(src: Path, family: str) -> dict:
    """higgs_ds_codec.json: the source's name (the codes are the same), and what it was converted from."""
    from higgs_ds.shards.codec import sha256_file

    path = src / MARKER_FILE
    marker = _read_json_object(path, MARKER_FILE) if path.is_file() else {"name": "higgs-audio-v2-tokenizer"}
    weights = src / (BOSON_WEIGHTS if family == BOSON else NATIVE_WEIGHTS)
    return dict(marker, converted_from={"format": family, "weights_sha256": sha256_file(weights)})


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _to_native(src: Path, tmp: Path) -> None:
    from safetensors.torch import save_file

    boson, teacher = read_boson_config(src)
    config = native_config(boson, teacher, src / CONFIG_FILE)  # settings first: refused before the weights load
    tensors = read_boson_weights(src)
    out = boson_to_native_tensors(tensors, _table_for_boson(boson), src)  # names the keys off the table
    _check_shapes(tensors, boson_class_shapes(boson, teacher), "boson's HiggsAudioTokenizer", src)
    _check_shapes(out, native_class_shapes(config), NATIVE_CLASS, src)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in out.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # what from_pretrained(dtype="auto") loads it as, as save_pretrained records
        config["dtype"] = dtypes.pop()
    save_file({k: t.contiguous() for k, t in out.items()}, str(tmp / NATIVE_WEIGHTS), metadata={"format": "pt"})
    _write_json(tmp / CONFIG_FILE, config)
    _write_json(tmp / PREPROCESSOR_FILE, FEATURE_EXTRACTOR)
    _write_json(tmp / MARKER_FILE, _marker(src, BOSON))


def _to_boson(src: Path, tmp: Path) -> None:
    import torch

    native = _read_json_object(src / CONFIG_FILE, "config.json")
    boson, teacher = boson_config(native, src / CONFIG_FILE)  # settings first: refused before the weights load
    tensors = read_native_weights(src)
    out = native_to_boson_tensors(tensors, _table_for_native(native), src)  # names the keys off the table
    _check_shapes(tensors, native_class_shapes(native), NATIVE_CLASS, src)
    _check_shapes(out, boson_class_shapes(boson, teacher), "boson's HiggsAudioTokenizer", src)
    torch.save(out, tmp / BOSON_WEIGHTS)
    _write_json(tmp / CONFIG_FILE, boson)
    _write_json(tmp / TEACHER_CONFIG, teacher)
    _write_json(tmp / MARKER_FILE, _marker(src, NATIVE))


def convert_codec(src_dir: str | os.PathLike, to: str, out_dir: str | os.PathLike) -> Path:
    """Convert the codec directory `src_dir` to the `to` format ("native" | "boson") at `out_dir` (a new or
    empty folder, written whole or not at all). Returns the output directory."""
    src = Path(src_dir)
    if to not in FAMILIES:
        raise ConvertError(f"{src}: --to {to!r}: choose one of {', '.join(FAMILIES)}")
    try:
        family = codec_family(src)
    except FamilyError as err:
        raise ConvertError(str(err)) from None
    if family == to:
        raise ConvertError(f"{src} is already a {to}-format codec: nothing to convert")
    out = Path(os.path.realpath(out_dir))
    _check_out(src, out)
    build_new_folder(out, "convert-codec", lambda tmp: (_to_native if to == NATIVE else _to_boson)(src, tmp))
    return out
