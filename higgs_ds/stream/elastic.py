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
    """Micro-batches in global order, each a span of one rank's rows in the epoch's layout (what
    EpochLayout.rank_spans spans): batch j is rows begin[j] .. begin[j] + size[j] - 1 of the ranks' rows
    back to back (rank r's rows are r x per_rank onwards). Spans, not samples: a resume needs every batch's
    size, but the samples of this rank's batches alone."""

    begin: np.ndarray
    size: np.ndarray
    repeated: np.ndarray  # bool per batch: a batch of one repeated sample, added to equalise
    split: np.ndarray  # bool per batch: the second half of a batch split to equalise (one per split)

    def __len__(self) -> int:
        return len(self.size)

    def sizes(self) -> np.ndarray:
        return self.size

    def suffix(self, first: int) -> "GlobalBatches":
        """Batches first, first + 1, ... (what is left after `first` were consumed)."""
        return self.select(slice(first, None))

    def select(self, ids) -> "GlobalBatches":
        return GlobalBatches(self.begin[ids], self.size[ids], self.repeated[ids], self.split[ids])

    def rows(self, layout: EpochLayout) -> tuple[np.ndarray, np.ndarray]:
        """The batches' flat sample numbers and where each batch starts in them."""
        rank, a = np.divmod(self.begin, layout.per_rank)
        starts = np.concatenate([[0], np.cumsum(self.size)]).astype(np.int64)
        return layout.span_rows(rank, a, a + self.size), starts


def epoch_batches(layout: EpochLayout) -> GlobalBatches:
    """The epoch's plan at layout.world ranks as one global sequence (rank r's batch k is batch k*W + r):
    every rank's batch sizes, all ranks at once, O(batches); no sample is looked at."""
    world, target = layout.world, layout.target
    spans = layout.rank_spans(np.arange(world))  # rank after rank, `target` batches each
    begin = (spans.group * layout.per_rank + spans.a).reshape(world, target)
    size = (spans.b - spans.a).reshape(world, target)
    none = np.zeros(world * target, dtype=bool)
    # global batch k*W + r: transpose to (target, world), then flatten
    return GlobalBatches(begin.T.ravel(), size.T.ravel(), none, none.copy())


def equalise(batches: GlobalBatches, world: int) -> GlobalBatches:
    """Make the count a multiple of `world`: split the largest batches in two (ties: the earlier; the halves
    stay in place, the first keeps the batch's flags), and only when no batch has two samples add batches
    of one repeated sample (the first remaining sample) at the end."""
    while len(batches) % world:
        need = world - len(batches) % world
        sizes = batches.size
        splittable = np.flatnonzero(sizes > 1)
        if splittable.size:
            cut = np.zeros(len(sizes), dtype=bool)
            cut[splittable[np.argsort(-sizes[splittable], kind="stable")[:need]]] = True
            copies = 1 + cut
            second = (np.cumsum(copies) - copies)[cut] + 1
            begin, size = np.repeat(batches.begin, copies), np.repeat(sizes, copies)
            repeated, split = np.repeat(batches.repeated, copies), np.repeat(batches.split, copies)
            half = sizes[cut] // 2
            size[second - 1], size[second] = half, size[second] - half
            begin[second] += half
            split[second], repeated[second] = True, False
            batches = GlobalBatches(begin, size, repeated, split)
        else:
            if not len(batches):
                raise PlanError("no samples are left in the epoch to continue it with")
            batches = GlobalBatches(
                np.concatenate([batches.begin, np.repeat(batches.begin[:1], need)]),
                np.concatenate([batches.size, np.ones(need, dtype=batches.size.dtype)]),
                np.concatenate([batches.repeated, np.ones(need, bool)]),
                np.concatenate([batches.split, np.zeros(need, bool)]),
            )
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
    mine = rest.select(slice(rank, None, world))
    rows, starts = mine.rows(layout)
    return layout.plan_of(rows, starts, repeated=int(mine.repeated.sum()), split=int(mine.split.sum()))
