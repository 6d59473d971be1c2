"""resume_reset_optimizer: continue from a checkpoint's weights with a fresh optimizer, when the user asks.

The normal resume carries everything over, at any number of ranks (universal.py). Where DeepSpeed cannot
convert a checkpoint (a ZeRO layout its converter does not know, a damaged optimizer partition), or where a
user wants new optimizer settings, `resume_reset_optimizer = true` restores the model's weights, the
learning-rate schedule, the step count and the data position, and starts Adam's moments from zero. It is
never chosen silently: the conversion error names it, and the run logs that the optimizer was reset.

The weights are DeepSpeed's own consolidation of the ZeRO partitions (`zero_to_fp32`), which reads them at
any saved world size: the fp32 master weights, exact on a float32 run; on a bf16 run the model's bf16
parameters take them and the fresh fp32 master copy is rebuilt from those (one rounding). Rank 0 reads the
checkpoint (one fp32 copy of the model in its host memory) and every parameter goes to the other ranks as it
does in ZeRO-3's own loading (GatheredParameters with rank 0 as the modifier; a broadcast for ZeRO-1/2).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from swift.utils import get_logger

from higgs_ds.train.checkpoint import CheckpointError, deepspeed_tag

logger = get_logger()
ENV_RESET_OPTIMIZER = "HIGGS_DS_RESUME_RESET_OPTIMIZER"  # "1": resume_reset_optimizer on the `swift sft` path


def reset_requested(default: bool) -> bool:
    return default or os.environ.get(ENV_RESET_OPTIMIZER, "") == "1"


@contextlib.contextmanager
def weights_only_deepspeed_resume(trainer):
    """During trainer.train(): HF's DeepSpeed checkpoint load becomes a load of the weights alone.

    transformers calls `deepspeed_load_checkpoint` by its module-level name (ms-swift swaps it the same way
    for its resume_only_model); refusing to start when the name is gone keeps a transformers upgrade from
    turning this into a full load without notice."""
    from transformers import trainer as hf_trainer

    if not hasattr(hf_trainer, "deepspeed_load_checkpoint"):
        raise CheckpointError(
            "resume_reset_optimizer: this transformers version no longer loads DeepSpeed checkpoints through "
            "transformers.trainer.deepspeed_load_checkpoint; higgs-ds cannot reset the optimizer with it"
        )
    original = hf_trainer.deepspeed_load_checkpoint

    def load_weights(engine, checkpoint_path, load_module_strict=True):
        load_consolidated_weights(engine, checkpoint_path, trainer.args.process_index == 0)

    hf_trainer.deepspeed_load_checkpoint = load_weights
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original


def load_consolidated_weights(engine, checkpoint: str | os.PathLike, is_main: bool) -> None:
    """The checkpoint's fp32 weights -> every parameter of the DeepSpeed engine; its optimizer untouched."""
    ckpt = Path(checkpoint)
    params = list(engine.module.named_parameters())
    weights, problem = {}, None
    if is_main:
        try:
            weights = _read_fp32(ckpt)
            problem = _mismatch(ckpt, weights, params)
        except CheckpointError as err:
            problem = str(err)
    problem = _from_rank0(problem)  # every rank stops alike: none is left waiting in a collective
    if problem:
        raise CheckpointError(problem)
    for name, param in params:
        _set_from_rank0(param, weights.get(name))
    engine.global_steps = int(deepspeed_tag(ckpt).removeprefix("global_step"))  # as DeepSpeed's own load sets it
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:  # ZeRO's fp32 master partitions are rebuilt from the new parameters
        refresh()
    logger.info(
        f"resume_reset_optimizer: {len(params)} parameters loaded from {ckpt} (DeepSpeed's fp32 consolidation); "
        "the optimizer starts fresh (Adam's moments at zero), the schedule, step and data position continue"
    )


def _mismatch(ckpt: Path, weights: dict, params) -> str | None:
    missing = [name for name, _ in params if name not in weights]
    if missing:
        return (
            f"{ckpt} holds no weights for {len(missing)} parameters of this model (e.g. {missing[0]}): it was "
            "saved from another model or train_modules setting"
        )
    for name, param in params:
        want, got = tuple(getattr(param, "ds_shape", param.shape)), tuple(weights[name].shape)
        if want != got:
            return f"{ckpt}: the weight {name} has shape {got}, this model's {want}: it was saved from another model"
    return None


def _from_rank0(problem: str | None) -> str | None:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return problem
    box = [problem]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _read_fp32(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), deepspeed_tag(ckpt), lazy_mode=True)
    except CheckpointError:
        raise
    except Exception as err:  # DeepSpeed's own reader: its message says which file
        raise CheckpointError(
            f"DeepSpeed could not consolidate the weights of {ckpt} ({type(err).__name__}: {err}): "
            "resume from another checkpoint-N of the run"
        ) from None


def _set_from_rank0(param: torch.nn.Parameter, value) -> None:
    """Rank 0's value into the parameter on every rank (value is None on the other ranks)."""
    if hasattr(param, "ds_id"):  # ZeRO-3: gathered, set on rank 0, re-partitioned from rank 0's copy
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if value is not None:
                _copy(param, value)
        return
    if value is not None:
        _copy(param, value)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(param.data, src=0)


def _copy(param: torch.nn.Parameter, value) -> None:
    tensor = value.contiguous()  # a lazy tensor of zero_to_fp32 is read here (shapes checked before)
    with torch.no_grad():
        param.data.copy_(tensor.to(param.data.dtype))
