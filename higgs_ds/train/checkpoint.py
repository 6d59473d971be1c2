"""Checkpoints on disk: which are complete, where each rank's data position is kept, and stop requests.

A checkpoint directory `OUTPUT_DIR/checkpoint-N` is written by HF Trainer / DeepSpeed (model, optimizer
partitions, scheduler, trainer_state.json, one rng_state per rank) plus one `data_state_rank{R}.json` per
rank (the shard stream's position, written before anything else). It counts as complete only when
trainer_state.json and every rank's data state and rng state are there and parse (a file torn by a full
disk or a kill makes it incomplete: `latest_complete` then picks an older one), so a checkpoint cut short
is never resumed from. A data state is written atomically (fsync, rename, fsync of the directory), and
`read_data_state` refuses one that is not what `EpochDataLoader.state_dict` writes, naming the file.

A run stops cleanly (saves a checkpoint, then exits) when `OUTPUT_DIR/STOP` or the file named by
$HIGGS_DS_STOP_FILE appears: the SLURM script creates it on the pre-timeout signal.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.safe_io import atomic_write_json

STOP_FILE_ENV = "HIGGS_DS_STOP_FILE"
_INSTEAD = "resume from an earlier checkpoint (resume = PATH) or train into a new output_dir"
_DATA_STATE = re.compile(r"data_state_rank(\d+)\.json")


class CheckpointError(UserError):
    """A checkpoint file that cannot be resumed from; the message names it."""


def data_state_path(checkpoint: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint) / f"data_state_rank{rank}.json"


def write_data_state(checkpoint: str | os.PathLike, rank: int, world_size: int, state: dict) -> None:
    path = data_state_path(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dict(state, world_size=world_size), indent=None)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value, minimum: int = 0) -> bool:
    return _is_int(value) and value >= minimum


def check_data_state(state, source) -> None:
    """The shape EpochDataLoader.state_dict writes: a JSON object with non-negative integer epoch,
    batches_done and rank, a world size > rank, an integer seed and, when present, a plan object."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a JSON {type(state).__name__}, not a data position object: {_INSTEAD}")
    problems = [key for key in ("epoch", "batches_done", "rank") if not _is_count(state.get(key))]
    if not _is_count(state.get("world_size"), 1) or (not problems and state["rank"] >= state["world_size"]):
        problems.append("world_size")
    if not _is_int(state.get("seed")):
        problems.append("seed")
    if "plan" in state and not isinstance(state["plan"], dict):
        problems.append("plan")
    if "segments" in state and not _segments_ok(state):
        problems.append("segments")
    if problems:
        raise CheckpointError(
            f"{source} is not a data position written by higgs-ds training (bad or missing "
            f"{', '.join(problems)}): {_INSTEAD}"
        )


def _segments_ok(state: dict) -> bool:
    """[[world, batches], ...] with world >= 1 and batches >= 0, the last one this state's own."""
    segments = state["segments"]
    if not isinstance(segments, list) or not segments or len(segments) > 10_000:
        return False
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 2 and _is_count(seg[0], 1) and _is_count(seg[1])):
            return False
    return segments[-1] == [state.get("world_size"), state.get("batches_done")]


def read_resume_state(checkpoint: str | os.PathLike, rank: int, world_size: int) -> dict | None:
    """The data position rank `rank` of a run on `world_size` ranks continues from: its own when the
    checkpoint was saved on as many ranks; else the global position every saved rank holds (they took the
    same number of batches in lockstep: refused when they disagree). None when the checkpoint has none."""
    first = read_data_state(checkpoint, 0)
    if first is None or first["world_size"] == world_size:
        return read_data_state(checkpoint, rank)
    states = [first] + [read_data_state(checkpoint, r) for r in range(1, first["world_size"])]
    missing = [r for r, st in enumerate(states) if st is None]
    if missing:
        raise CheckpointError(
            f"{checkpoint} was saved on {first['world_size']} ranks but holds no data position for rank(s) "
            f"{missing[:8]}: the checkpoint is incomplete; {_INSTEAD}"
        )
    fields = ("epoch", "batches_done", "segments", "plan", "world_size")
    differ = [st["file"] for st in states if any(st.get(k) != first.get(k) for k in fields)]
    if differ:
        raise CheckpointError(
            f"{differ[0]} holds another data position than {first['file']}: ranks run in lockstep, so the "
            f"checkpoint was not written by one higgs-ds run; {_INSTEAD}"
        )
    return first


def _load_json(path: Path):
    """The file's JSON value; CheckpointError naming it when it cannot be read or parsed."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(
            f"{path} cannot be read as JSON ({err}): the checkpoint was cut short (a full disk or a kill while "
            f"saving); {_INSTEAD}"
        ) from None


def read_data_state(checkpoint: str | os.PathLike, rank: int) -> dict | None:
    """Rank `rank`'s saved data position (with "file": its path, for messages), None when there is none."""
    path = data_state_path(checkpoint, rank)
    if not path.is_file():
        return None
    state = _load_json(path)
    check_data_state(state, path)
    return dict(state, file=str(path))


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether `checkpoint` can be resumed from: every file higgs-ds relies on is there and parses. Never
    raises on what it finds (torn or hostile JSON is "not complete")."""
    try:
        return _check_complete(Path(checkpoint))
    except (UserError, OSError, ValueError):
        return False


def deepspeed_tag(ckpt: Path) -> str:
    """The tag in DeepSpeed's `latest` file, refused unless it names a global_stepN folder of this checkpoint
    (a bare name: no path out of it, no symlink)."""
    latest = ckpt / "latest"
    tag = latest.read_text(errors="replace").strip() if latest.stat().st_size <= 256 else ""
    if not re.fullmatch(r"global_step\d+", tag) or not (ckpt / tag).is_dir() or (ckpt / tag).is_symlink():
        raise CheckpointError(
            f"{latest} names {tag[:80]!r}, not a global_stepN folder of {ckpt}: the checkpoint is damaged or "
            "not DeepSpeed's; use another checkpoint-N of the run"
        )
    return tag


def _check_complete(ckpt: Path) -> bool:
    model_configs = [ckpt / name for name in ("config.json", "adapter_config.json") if (ckpt / name).is_file()]
    if not (ckpt / "trainer_state.json").is_file() or not model_configs:  # a full model or a LoRA adapter
        return False
    if not all(isinstance(_load_json(path), dict) for path in [ckpt / "trainer_state.json", *model_configs]):
        return False
    if (ckpt / "latest").is_file():
        deepspeed_tag(ckpt)  # raises when it points anywhere but a global_stepN folder of ckpt
    files = {int(m.group(1)): ckpt / m.group(0) for p in ckpt.iterdir() if (m := _DATA_STATE.fullmatch(p.name))}
    if not files:
        return True  # a checkpoint written outside higgs-ds training (e.g. a plain HF one)
    states = {}
    for rank, path in files.items():
        states[rank] = _load_json(path)
        check_data_state(states[rank], path)
    worlds = {state["world_size"] for state in states.values()}
    ranks_match = all(state["rank"] == rank for rank, state in states.items())
    if len(worlds) != 1 or not ranks_match or set(states) != set(range(worlds.pop())):
        return False
    rng = [p for p in ckpt.glob("rng_state*.pth") if p.stat().st_size > 0]
    return len(states) == 1 or len(rng) >= len(states)


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
