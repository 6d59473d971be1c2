"""Checkpoints on disk: which are complete, where each rank's data position is kept, and stop requests.

A checkpoint directory `OUTPUT_DIR/checkpoint-N` is written by HF Trainer / DeepSpeed (model, optimizer
partitions, scheduler, trainer_state.json, one rng_state per rank) plus one `data_state_rank{R}.json` per
rank (the shard stream's position, written before anything else). It counts as complete only when
trainer_state.json and every rank's data state and rng state are there, so a checkpoint cut short by a
kill is never resumed from.

A run stops cleanly (saves a checkpoint, then exits) when `OUTPUT_DIR/STOP` or the file named by
$HIGGS_DS_STOP_FILE appears: the SLURM script creates it on the pre-timeout signal.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

STOP_FILE_ENV = "HIGGS_DS_STOP_FILE"


def data_state_path(checkpoint: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint) / f"data_state_rank{rank}.json"


def write_data_state(checkpoint: str | os.PathLike, rank: int, world_size: int, state: dict) -> None:
    path = data_state_path(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(state, world_size=world_size)) + "\n")
    os.replace(tmp, path)


def read_data_state(checkpoint: str | os.PathLike, rank: int) -> dict | None:
    path = data_state_path(checkpoint, rank)
    return json.loads(path.read_text()) if path.is_file() else None


def is_complete(checkpoint: str | os.PathLike) -> bool:
    ckpt = Path(checkpoint)
    has_model = (ckpt / "config.json").is_file() or (ckpt / "adapter_config.json").is_file()  # full or LoRA
    if not (ckpt / "trainer_state.json").is_file() or not has_model:
        return False
    states = sorted(ckpt.glob("data_state_rank*.json"))
    if not states:
        return True  # a checkpoint written outside higgs-ds training (e.g. a plain HF one)
    world = json.loads(states[0].read_text()).get("world_size", len(states))
    rng = list(ckpt.glob("rng_state*.pth"))
    return len(states) == world and (world == 1 or len(rng) >= world)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    found = [c for c in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", c.name)]
    return sorted(found, key=lambda c: int(c.name.split("-")[1]))


def latest_complete(output_dir: str | os.PathLike) -> Path | None:
    complete = [c for c in checkpoints(output_dir) if is_complete(c)]
    return complete[-1] if complete else None


def stop_files(output_dir: str | os.PathLike) -> list[Path]:
    paths = [Path(output_dir) / "STOP"]
    if os.environ.get(STOP_FILE_ENV):
        paths.append(Path(os.environ[STOP_FILE_ENV]))
    return paths


def stop_requested(output_dir: str | os.PathLike) -> bool:
    return any(p.exists() for p in stop_files(output_dir))
