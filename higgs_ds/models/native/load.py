"""Loading a native model directory strictly: every weight in the checkpoint is used, none is missing.

transformers' from_pretrained only warns about missing weights (it initialises them at random) and drops
unexpected ones; HiggsAudioV2ForConditionalGeneration even drops `text_lm_head.weight` on purpose when
built without the text head. Training on such a model would silently start from random parts, so the
checkpoint's safetensors headers (names and shapes only, no tensor data; higgs_ds.models.strict) are compared
with what the class expects before anything is loaded, and any difference is a UserError naming the
directory and the keys.
"""

from __future__ import annotations

from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.models.native.layout import CONFIG_FILE

TEXT_HEAD = "text_lm_head.weight"
CLASS_NAME = "HiggsAudioV2ForConditionalGeneration"


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


def check_checkpoint(model_dir: Path, config) -> None:
    """Refuse a checkpoint whose weights are not exactly the class's (names and shapes, headers only)."""
    from higgs_ds.models.strict import check_state_dict_matches, read_headers

    if TEXT_HEAD not in read_headers(model_dir):
        raise CheckpointMismatch(
            f"{model_dir}: no {TEXT_HEAD}: the directory was saved without the text head (use_text_head=False), "
            "which higgs-ds trains: convert boson's release (revision 10840182) with "
            "`higgs-ds convert DIR --to native --out OUT`, or export the model again"
        )
    check_state_dict_matches(model_dir, expected_shapes(config), f"{CLASS_NAME}(use_text_head=True)")


def _torch_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"dtype {dtype!r}: use float32, bfloat16, float16 or auto")
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
    check_checkpoint(model_dir, config)
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
