"""The rest of an epoch on another number of ranks (elastic resume).

An epoch's plan at W ranks is, read globally, one sequence of micro-batches: rank r's k-th batch is global
batch k*W + r, and after every rank has taken b batches (ranks run in lockstep) the first b*W global batches
are consumed, whatever W is. So a data position is global: the epoch's plan at the world size it started
with, then a chain of segments [(W0, b0), (W1, b1), ...]: W_i ranks took b_i batches each of what the
previous segments left. The rest of the epoch, at the world size of now, is the remaining global batches in
order, dealt round-robin: rank r takes batches r, r + W, r + 2W, ... The batches themselves are the ones the
uninterrupted run would have read (same samples, same composition, same order), so nothing is skipped or
repeated; only when the remaining count is not a multiple of W are the largest remaining batches split in
two (no sample added), and a sample is repeated (counted) only when no batch can be split. A resume at the
same world size is the chain with one segment: exactly the plan it had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from higgs_ds.stream.plan import EpochLayout, EpochPlan, PlanError


@dataclass(frozen=True)
class GlobalBatches:
    """Micro-batches in global order: batch j is the flat sample numbers rows[starts[j]:starts[j + 1]]."""

    rows: np.ndarray
    starts: np.ndarray
    repeated: np.ndarray  # bool per batch: a batch of one repeated sample, added to equalise
    split: np.ndarray  # bool per batch: the second half of a batch split to equalise (one per split)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def suffix(self, first: int) -> "GlobalBatches":
        """Batches first, first + 1, ... (what is left after `first` were consumed)."""
        base = self.starts[first]
        return GlobalBatches(self.rows[base:], self.starts[first:] - base, self.repeated[first:], self.split[first:])

    def select(self, ids: np.ndarray) -> "GlobalBatches":
        sizes = self.sizes()[ids]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return GlobalBatches(_gather(self.rows, self.starts[ids], sizes), starts, self.repeated[ids], self.split[ids])


def _gather(rows: np.ndarray, begins: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """rows[b:b + n] for each (b, n), concatenated, without a Python loop."""
    total = int(sizes.sum())
    if not total:
        return rows[:0]
    out_starts = np.cumsum(sizes) - sizes
    return rows[np.repeat(begins - out_starts, sizes) + np.arange(total)]


def epoch_batches(layout: EpochLayout) -> GlobalBatches:
    """The epoch's plan at layout.world ranks as one global sequence (rank r's batch k is batch k*W + r).
    Every rank's batches are formed: O(samples), once per elastic resume."""
    parts = [layout.rank_rows(r) for r in range(layout.world)]
    world, per_rank = layout.world, layout.target
    sizes = np.stack([np.diff(starts) for _, starts, _, _ in parts])  # world x target
    offsets = np.cumsum([0] + [len(rows) for rows, _, _, _ in parts[:-1]])
    begins = np.stack([starts[:-1] for _, starts, _, _ in parts]) + offsets[:, None]
    # global batch k*W + r: transpose to (target, world), then flatten
    sizes_g, begins_g = sizes.T.ravel(), begins.T.ravel()
    rows = _gather(np.concatenate([rows for rows, _, _, _ in parts]), begins_g, sizes_g)
    starts = np.concatenate([[0], np.cumsum(sizes_g)]).astype(np.int64)
    none = np.zeros(world * per_rank, dtype=bool)
    return GlobalBatches(rows, starts, none, none.copy())


def equalise(batches: GlobalBatches, world: int) -> GlobalBatches:
    """Make the count a multiple of `world`: split the largest batches in two (ties: the earlier; the halves
    stay in place), and only when no batch has two samples add batches of one repeated sample (the first
    remaining sample) at the end."""
    while len(batches) % world:
        need = world - len(batches) % world
        sizes = batches.sizes()
        splittable = np.flatnonzero(sizes > 1)
        if splittable.size:
            largest = splittable[np.argsort(-sizes[splittable], kind="stable")[:need]]
            halves = batches.starts[largest] + sizes[largest] // 2
            # flags per start (the last start ends the last batch); a half sorts right after its batch's start
            starts = np.concatenate([batches.starts, halves])
            order = np.argsort(starts, kind="stable")
            new = np.ones(len(halves), bool)
            split = np.concatenate([batches.split, [False], new])[order][:-1]
            repeated = np.concatenate([batches.repeated, [False], ~new])[order][:-1]
            batches = GlobalBatches(batches.rows, starts[order], repeated, split)
        else:
            if not len(batches):
                raise PlanError("no samples are left in the epoch to continue it with")
            first = batches.rows[:1]
            rows = np.concatenate([batches.rows, np.repeat(first, need)])
            starts = np.concatenate([batches.starts, batches.starts[-1] + np.arange(1, need + 1)])
            repeated = np.concatenate([batches.repeated, np.ones(need, bool)])
            split = np.concatenate([batches.split, np.zeros(need, bool)])
            batches = GlobalBatches(rows, starts, repeated, split)
    return batches


def remaining_batches(layout: EpochLayout, segments: list[tuple[int, int]], world: int) -> GlobalBatches:
    """What the chain of segments left of the epoch, equalised for `world` ranks. The layout is the epoch's
    at the world size of the first segment."""
    batches = epoch_batches(layout)
    for i, (seg_world, done) in enumerate(segments):
        if i:
            batches = equalise(batches, seg_world)
        if seg_world * done > len(batches):
            raise PlanError(
                f"the saved data position says {seg_world} ranks took {done} micro-batches each in segment {i} of "
                f"the epoch, but only {len(batches)} were left: it was saved with other settings or shards"
            )
        batches = batches.suffix(seg_world * done)
    return equalise(batches, world)


def resumed_plan(layout: EpochLayout, segments: list[tuple[int, int]], rank: int, world: int) -> EpochPlan:
    """Rank `rank` of `world`'s share of the rest of the epoch after `segments` (see the module docstring)."""
    if not segments or segments[0][0] != layout.world:
        raise PlanError("an elastic plan starts from the epoch's layout at its first segment's world size")
    if not 0 <= rank < world:
        raise PlanError(f"rank {rank} is outside world size {world}")
    rest = remaining_batches(layout, segments, world)
    mine = rest.select(np.arange(rank, len(rest), world))
    return layout.plan_of(mine.rows, mine.starts, repeated=int(mine.repeated.sum()), split=int(mine.split.sum()))
