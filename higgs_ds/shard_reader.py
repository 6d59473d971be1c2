"""Stage 5 of the data flow: shard directories -> this rank's and this worker's raw samples.

The plan for an epoch is made from the indexes alone, before reading anything, so every rank knows
how many samples (and so batches) every other rank gets:

1. the global order: shards in a (seed, epoch)-shuffled order, samples in shard order;
2. padded, by repeating samples from the start of that order, to a multiple of world_size; the number
   of repeats is reported, never silent;
3. rank r takes the r-th contiguous block (so a rank opens few shards), and dataloader worker w the
   w-th contiguous part of that block.

Only the two member types the builder writes are decoded: `.json` (UTF-8 JSON) and `.codes.npy`
(numpy without pickle). Anything else in a shard is an error naming the shard and the member.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.shard_writer import INDEX_NAME, SCHEMA_VERSION

MEMBER_TYPES = ("json", "codes.npy")


class ShardError(UserError):
    """A shard or index that cannot be read; the message names the file."""


@dataclass(frozen=True)
class ShardRef:
    path: str
    num_samples: int


def load_index(shard_dir: str | Path, check_files: bool = True) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path} not found: is {shard_dir} a directory written by `higgs-ds shards build`?")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path} is not valid JSON ({err})") from None
    if index.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path} has schema {index.get('schema_version')}, this reader reads {SCHEMA_VERSION}; "
            "rebuild the shards with this version of higgs-ds"
        )
    for shard in index["shards"] if check_files else []:
        if not (Path(shard_dir) / shard["file"]).is_file():
            raise ShardError(f"shard {Path(shard_dir) / shard['file']} is listed in {path} but missing")
    return index


def shard_refs(shard_dirs: list[str]) -> list[ShardRef]:
    refs = []
    for d in shard_dirs:
        refs += [ShardRef(str(Path(d) / s["file"]), s["num_samples"]) for s in load_index(d)["shards"]]
    return refs


@dataclass(frozen=True)
class EpochPlan:
    """Which (shard, sample) positions this rank reads in one epoch, and how many were repeats."""

    positions: list[tuple[int, int]]
    num_global: int
    num_repeated: int


def plan_epoch(refs: list[ShardRef], *, seed: int, epoch: int, rank: int, world_size: int) -> EpochPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    order = list(range(len(refs)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    positions = [(s, i) for s in order for i in range(refs[s].num_samples)]
    if not positions:
        raise ShardError("the shard set holds no samples")
    per_rank = -(-len(positions) // world_size)
    repeats = per_rank * world_size - len(positions)
    padded = positions + [positions[i % len(positions)] for i in range(repeats)]
    return EpochPlan(padded[rank * per_rank : (rank + 1) * per_rank], len(positions), repeats)


def split_for_worker(positions: list, worker: int, num_workers: int) -> list:
    """Contiguous part `worker` of `positions` (sizes differ by at most one)."""
    base, extra = divmod(len(positions), num_workers)
    start = worker * base + min(worker, extra)
    return positions[start : start + base + (1 if worker < extra else 0)]


def _decode_member(shard: str, name: str, data: bytes):
    suffix = name.split(".", 1)[1] if "." in name else ""
    if suffix == "json":
        return json.loads(data.decode("utf-8"))
    if suffix == "codes.npy":
        codes = np.load(io.BytesIO(data), allow_pickle=False)
        if codes.dtype != np.uint16 or codes.ndim != 2:
            raise ShardError(f"{shard}: member {name} has dtype {codes.dtype} shape {codes.shape}, expected uint16 2-D")
        return codes
    raise ShardError(f"{shard}: unexpected member {name!r}; higgs-ds shards hold only {MEMBER_TYPES}")


def read_shard(path: str, wanted: set[int] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (sample position in shard, {"json": ..., "codes": ...}) for the wanted positions, in order."""
    try:
        with tarfile.open(path, "r:") as tar:
            position, current_key, current = -1, None, {}
            for member in tar:
                if not member.isfile():
                    raise ShardError(f"{path}: member {member.name!r} is not a regular file")
                key, _, suffix = member.name.partition(".")
                if key != current_key:
                    if current_key is not None and (wanted is None or position in wanted):
                        yield position, current
                    position, current_key, current = position + 1, key, {}
                if wanted is not None and position not in wanted:
                    continue  # tarfile seeks over the data of members we skip
                value = _decode_member(path, member.name, tar.extractfile(member).read())
                current["codes" if suffix == "codes.npy" else suffix] = value
            if current_key is not None and (wanted is None or position in wanted):
                yield position, current
    except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"cannot read shard {path}: {err}") from err


def read_positions(refs: list[ShardRef], positions: list[tuple[int, int]]) -> Iterator[dict]:
    """Read the samples at `positions` (consecutive runs of one shard are read in one pass), in order."""
    run: list[tuple[int, int]] = []
    for pos in positions + [(-1, -1)]:
        if run and pos[0] != run[0][0]:
            shard = refs[run[0][0]]
            found = dict(read_shard(shard.path, {i for _, i in run}))
            for _, i in run:
                if i not in found:
                    raise ShardError(f"{shard.path}: sample {i} missing (index says {shard.num_samples} samples)")
                yield found[i]
            run = []
        run.append(pos)
