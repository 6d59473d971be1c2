"""Loading a native model directory strictly: every weight in the checkpoint is used, none is missing.

transformers' from_pretrained only warns about missing weights (it initialises them at random) and drops
unexpected ones; HiggsAudioV2ForConditionalGeneration even drops `text_lm_head.weight` on purpose when
built without the text head. Training on such a model would silently start from random parts, so the
checkpoint's safetensors headers (names and shapes only, no tensor data) are compared with what the class
expects before anything is loaded, and any difference is a UserError naming the directory and the keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.models.native.layout import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

TEXT_HEAD = "text_lm_head.weight"
SHOWN_KEYS = 8  # keys named per kind of difference; the count says how many more


class CheckpointMismatch(UserError):
    """A native checkpoint whose weights are not exactly the model's."""


def expected_shapes(config) -> dict[str, tuple]:
    """The weights HiggsAudioV2ForConditionalGeneration(config, use_text_head=True) has, built on the meta
    device (no memory, no init)."""
    import torch
    from transformers import HiggsAudioV2ForConditionalGeneration

    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _header_shapes(path: Path) -> dict[str, tuple]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointMismatch(f"{path}: not a readable safetensors file ({err})") from None


def _shard_names(model_dir: Path) -> dict[str, str]:
    """key -> shard file of a sharded checkpoint's index, each shard a plain file name beside the index."""
    index = model_dir / WEIGHTS_INDEX_FILE
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise CheckpointMismatch(f"{index}: not a readable safetensors index ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointMismatch(f"{index}: 'weight_map' must map weight names to shard file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointMismatch(f"{index}: shard {shard!r} is not a file name in {model_dir}")
    return weight_map


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple]:
    """name -> shape of every tensor in the directory's model.safetensors or sharded checkpoint."""
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS_FILE).is_file():
        return _header_shapes(model_dir / WEIGHTS_FILE)
    if not (model_dir / WEIGHTS_INDEX_FILE).is_file():
        raise CheckpointMismatch(
            f"{model_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}: not a native model directory"
        )
    weight_map = _shard_names(model_dir)
    shapes: dict[str, tuple] = {}
    for shard in sorted(set(weight_map.values())):
        shard_shapes = _header_shapes(model_dir / shard)
        for key, file in weight_map.items():
            if file == shard and key not in shard_shapes:
                raise CheckpointMismatch(f"{model_dir / WEIGHTS_INDEX_FILE}: {key} is not in {shard}")
        shapes.update(shard_shapes)
    return shapes


def _named(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def check_checkpoint(model_dir: str | Path, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """CheckpointMismatch naming the missing, unexpected and mis-shaped weights, if any."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing weights: {_named(missing)}")
    if unexpected:
        parts.append(f"unexpected weights: {_named(unexpected)}")
    if shapes:
        parts.append("wrong shapes: " + _named([f"{k} {found[k]} (model: {expected[k]})" for k in shapes]))
    hint = (
        f"; without {TEXT_HEAD} the directory was saved without the text head (use_text_head=False), which "
        "higgs-ds trains: convert boson's release with `higgs-ds convert DIR --to native --out OUT`"
        if TEXT_HEAD in missing
        else "; a boson-format directory converts with `higgs-ds convert DIR --to native --out OUT`"
    )
    raise CheckpointMismatch(
        f"{model_dir}: the weights are not HiggsAudioV2ForConditionalGeneration(use_text_head=True)'s: "
        + "; ".join(parts)
        + hint
    )


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def load_native_model(model_dir: str | Path, dtype=None, device: str | None = "cpu"):
    """HiggsAudioV2ForConditionalGeneration.from_pretrained(model_dir, use_text_head=True), strictly: a
    missing or unexpected weight (a missing text_lm_head.weight included) or a wrong shape is a UserError
    naming the directory and the keys. No remote code: the concrete class, and trust.check_model_dir first.
    `dtype` None keeps the checkpoint's; `device` None leaves the weights where from_pretrained put them."""
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration
    from transformers.integrations import is_deepspeed_zero3_enabled

    from higgs_ds.models.family import require_model_family
    from higgs_ds.models.trust import check_model_dir

    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    require_model_family(model_dir)
    try:
        config = HiggsAudioV2Config.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{model_dir / CONFIG_FILE}: not a HiggsAudioV2Config ({err})") from None
    check_checkpoint(model_dir, expected_shapes(config), checkpoint_shapes(model_dir))
    kwargs = {} if dtype is None else {"dtype": _torch_dtype(dtype)}
    model, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(
        str(model_dir), config=config, use_text_head=True, output_loading_info=True, **kwargs
    )
    # the headers matched; this is the loader's own account of the same, in case it skipped something
    leftovers = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if leftovers or info.get("error_msgs"):
        raise CheckpointMismatch(f"{model_dir}: transformers did not load the checkpoint exactly: {leftovers or info}")
    if device is not None and not is_deepspeed_zero3_enabled():
        model = model.to(device)
    return model
