"""DeepSpeed state on another number of ranks: DeepSpeed's own universal checkpoint.

A ZeRO checkpoint holds one optimizer partition per rank, so DeepSpeed refuses to load it at another world
size. Its universal format (one file per parameter and state: fp32 weights, exp_avg, exp_avg_sq) loads at
any size. On a resume at another world size, rank 0 converts `checkpoint-N/global_stepN` into
`checkpoint-N/global_stepN_universal` (DeepSpeed's `ds_to_universal`, which also writes `latest_universal`;
the ZeRO-1/2 layout needs its `--inject_missing_state`), every rank waits for it, and this run's DeepSpeed
config gets `checkpoint.load_universal` (only this run's: the next resume at the same size loads the ZeRO
checkpoint it writes). Measured with deepspeed 0.19.8 on CPU/gloo: ZeRO-1, 2 and 3 saved at 2 ranks load at
1, 2 and 4 with Adam's moments bit-identical.

Two traps of 0.19.8's ZeRO-3 universal load, both found by the loss of a resumed run drifting from the
uninterrupted one's (tests/test_elastic_resume.py):
* it copies the first optimizer group's hyperparameters into every group, so the group HF keeps without
  weight decay (biases, norms) would get it; `restore_group_settings` puts back each group's own settings
  (all but the learning rate, which the scheduler owns);
* it gives every parameter's Adam state the same `step` tensor, which torch's Adam increments in place once
  per group step: the second group's bias correction then runs ahead (step 3 at the second step after the
  resume); `untie_step_counters` gives each state its own copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from swift.trainers.utils import enable_deepspeed_load_universal
from swift.utils import get_logger

from higgs_ds.train.checkpoint import CheckpointError, deepspeed_tag, read_data_state

logger = get_logger()
_SCHEDULED = ("params", "lr", "initial_lr")  # what a group's settings do not include


def saved_world_size(checkpoint: str | os.PathLike) -> int | None:
    """The number of ranks the checkpoint was saved on (from its data positions); None without them."""
    state = read_data_state(checkpoint, 0)
    return None if state is None else state["world_size"]


def zero_stage(trainer) -> int:
    config = getattr(getattr(trainer.args, "hf_deepspeed_config", None), "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def prepare_resume_at_new_size(trainer, checkpoint: str) -> bool:
    """Make the checkpoint loadable at this run's world size; True when it was saved at another."""
    saved, now = saved_world_size(checkpoint), trainer.args.world_size
    if saved is None or saved == now:
        return False
    logger.info(f"{checkpoint} was saved on {saved} ranks; this run has {now}: resuming at the new size")
    if not trainer.is_deepspeed_enabled:  # HF's optimizer.pt is the whole optimizer: it loads at any size
        return True
    ckpt = Path(checkpoint)
    universal = ckpt / f"{deepspeed_tag(ckpt)}_universal"
    if trainer.args.process_index == 0 and not _converted(ckpt, universal):
        _convert(ckpt / deepspeed_tag(ckpt), universal, zero_stage(trainer))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the others wait for rank 0's conversion (a shared filesystem)
    if not _converted(ckpt, universal):
        raise CheckpointError(
            f"{universal} is missing after rank 0 converted it: is {ckpt} on a filesystem every node sees?"
        )
    enable_deepspeed_load_universal(trainer.args, trainer)
    return True


def _converted(ckpt: Path, universal: Path) -> bool:
    latest = ckpt / "latest_universal"
    return latest.is_file() and latest.read_text().strip() == universal.name and (universal / "zero").is_dir()


def _convert(source: Path, universal: Path, stage: int) -> None:
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(universal)]  # fmt: skip
    if stage < 3:
        command.append("--inject_missing_state")  # ZeRO-1/2 checkpoints lack what the converter expects
    logger.info(f"converting {source} to DeepSpeed's universal checkpoint: {' '.join(command)}")
    log = universal.parent / f"{universal.name}.log"
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise CheckpointError(
            f"DeepSpeed could not convert {source} to its universal format (exit {done.returncode}; {log}: "
            f"{' | '.join(tail)}): resume on the {_saved(source)} ranks it was saved on, or set "
            "resume_reset_optimizer = true to continue from its weights with a fresh optimizer"
        )


def _saved(source: Path) -> str:
    world = saved_world_size(source.parent)
    return str(world) if world else "number of"


def group_settings(optimizer) -> list[dict]:
    """Each optimizer group's hyperparameters but the learning rate (recorded when it is created)."""
    return [{k: v for k, v in group.items() if k not in _SCHEDULED} for group in optimizer.param_groups]


def restore_group_settings(optimizer, settings: list[dict]) -> list[str]:
    """Put back each group's settings after a universal load; the settings that had been overwritten."""
    changed = []
    for j, group in enumerate(optimizer.param_groups):
        own = settings[group.get("_ds_source_param_group_id", j)]  # ZeRO-3 may keep only groups with params
        for key, value in own.items():
            if key.startswith("_") or key not in group:
                continue
            if group[key] != value:
                changed.append(f"group {j} {key}: {group[key]} -> {value}")
                group[key] = value
    return changed


def untie_step_counters(optimizer) -> int:
    """Give every parameter's Adam state its own `step` tensor (see the module docstring); how many were shared."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's Adam
    seen, shared = set(), 0
    for state in getattr(inner, "state", {}).values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"], shared = step.clone(), shared + 1
            seen.add(id(state["step"]))
    return shared
