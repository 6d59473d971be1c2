"""The epoch plan: which micro-batches each rank reads in an epoch, decided from the shard indexes alone.

Because the plan is a pure function of (indexes, seed, epoch, world size, batching settings), every rank
computes every rank's plan without communicating, and:

* the global sample order is fixed by (seed, epoch): shards in a shuffled order, samples shuffled within
  each shard; it does not depend on the number of dataloader workers;
* each rank takes a contiguous block of that order (so it opens few shards), padded by repeating samples
  from the start of the order to equal size; repeats are counted;
* micro-batches are formed either of `batch_size` samples, or by a budget of expanded positions
  (`max_tokens`, padded rectangle: samples x longest sample) from length-sorted windows, so padding is
  small; samples longer than the budget or the model context are dropped and counted, never truncated;
* every rank gets the same number of micro-batches: a rank with fewer splits its largest batches
  (no sample repeated) and repeats a sample only when no batch can be split;
* worker w of a rank reads the rank's batches w, w+W, w+2W, ...; a DataLoader returns worker batches in
  that round-robin order, so the sequence of batches is the same for any number of workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from higgs_ds.errors import UserError

Position = tuple[int, int]  # (shard number in the shard list, sample number in the shard)


class PlanError(UserError):
    pass


@dataclass(frozen=True)
class ShardRef:
    path: str
    num_samples: int
    lengths: tuple[int, ...] | None = None
    """Expanded length of each sample (from a build with --tokenizer), in shard order."""


@dataclass(frozen=True)
class BatchingConfig:
    batch_size: int = 2
    max_tokens: int | None = None
    max_length: int | None = None
    window: int = 512
    """Samples sorted by length together before packing: larger packs tighter, smaller mixes more."""


@dataclass
class EpochPlan:
    batches: list[list[Position]]
    num_global: int
    num_repeated: int = 0
    num_dropped: int = 0
    num_split: int = 0
    dropped: list[Position] = field(default_factory=list)

    def real_position_fraction(self, refs: list[ShardRef]) -> float | None:
        if any(r.lengths is None for r in refs):
            return None
        real = sum(refs[s].lengths[i] for b in self.batches for s, i in b)
        padded = sum(len(b) * max(refs[s].lengths[i] for s, i in b) for b in self.batches)
        return real / padded if padded else None


def global_order(refs: list[ShardRef], seed: int, epoch: int) -> list[Position]:
    rng = random.Random(f"{seed}/{epoch}")
    shards = list(range(len(refs)))
    rng.shuffle(shards)
    order = []
    for s in shards:
        inner = list(range(refs[s].num_samples))
        random.Random(f"{seed}/{epoch}/{s}").shuffle(inner)
        order += [(s, i) for i in inner]
    return order


def _length(refs, pos: Position) -> int:
    return refs[pos[0]].lengths[pos[1]]


def _fixed_batches(positions: list[Position], size: int) -> list[list[Position]]:
    return [positions[i : i + size] for i in range(0, len(positions), size)]


def _budget_batches(positions, refs, cfg: BatchingConfig, rng: random.Random) -> list[list[Position]]:
    """Length-sorted windows packed greedily under max_tokens (padded rectangle), batches then shuffled."""
    batches = []
    step = cfg.window
    for start in range(0, len(positions), step):
        window = sorted(positions[start : start + step], key=lambda p: _length(refs, p))
        current: list[Position] = []
        for pos in window:
            if current and (len(current) + 1) * _length(refs, pos) > cfg.max_tokens:
                batches.append(current)
                current = []
            current.append(pos)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def _rank_batches(order, refs, cfg: BatchingConfig, rank: int, world: int, seed: int, epoch: int):
    per_rank = -(-len(order) // world)
    repeats = per_rank * world - len(order)
    padded = order + [order[i % len(order)] for i in range(repeats)]
    mine = padded[rank * per_rank : (rank + 1) * per_rank]
    repeats = max(0, (rank + 1) * per_rank - max(len(order), rank * per_rank))  # padding in this rank's block
    if cfg.max_tokens:
        return _budget_batches(mine, refs, cfg, random.Random(f"{seed}/{epoch}/batches/{rank}")), repeats
    return _fixed_batches(mine, cfg.batch_size), repeats


def _equalise(batches: list[list[Position]], target: int) -> tuple[list[list[Position]], int, int]:
    """Split the largest batches until there are `target`; repeat a sample only if none can be split."""
    batches, splits, repeats = [list(b) for b in batches], 0, 0
    while len(batches) < target:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]), default=None)
        if largest is not None and len(batches[largest]) > 1:
            b = batches[largest]
            batches[largest : largest + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
            splits += 1
        else:
            batches.append([batches[len(batches) % len(batches)][0]])
            repeats += 1
    return batches, splits, repeats


def plan_epoch(
    refs: list[ShardRef], cfg: BatchingConfig, *, seed: int, epoch: int, rank: int, world_size: int
) -> EpochPlan:
    if not 0 <= rank < world_size:
        raise PlanError(f"rank {rank} is outside world size {world_size}")
    if (cfg.max_tokens or cfg.max_length) and any(r.lengths is None for r in refs):
        missing = next(r.path for r in refs if r.lengths is None)
        raise PlanError(
            f"budget batching (max_tokens) and max_length need per-sample expanded lengths, which "
            f"{missing}'s index lacks: rebuild the shards with `higgs-ds shards build --tokenizer MODEL`"
        )
    order = global_order(refs, seed, epoch)
    limit = min(x for x in (cfg.max_tokens, cfg.max_length, 1 << 62) if x)
    kept = [p for p in order if refs[p[0]].lengths is None or _length(refs, p) <= limit]
    dropped = [p for p in order if refs[p[0]].lengths is not None and _length(refs, p) > limit]
    if len(kept) < world_size:
        raise PlanError(f"the shards hold {len(kept)} usable samples, fewer than the {world_size} ranks")
    every = [_rank_batches(kept, refs, cfg, r, world_size, seed, epoch) for r in range(world_size)]
    target = max(len(b) for b, _ in every)
    batches, repeats = every[rank]
    batches, splits, extra = _equalise(batches, target)
    return EpochPlan(
        batches=batches,
        num_global=len(order),
        num_repeated=repeats + extra,
        num_dropped=len(dropped),
        num_split=splits,
        dropped=dropped,
    )


def batches_for_worker(batches: list, worker: int, num_workers: int) -> list:
    """Worker `worker`'s share, in the round-robin order a DataLoader merges worker outputs in."""
    return batches[worker::num_workers]
