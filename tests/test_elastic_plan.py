"""The rest of an epoch on another number of ranks (higgs_ds.stream.elastic), on randomized configurations.

The uninterrupted run is the reference plan (tests/reference/plan_v1.py, one plan per rank); what a stopped
run consumed is each of its ranks' first b batches there. Resumed on W' ranks (and again on W''), the ranks
get equal batch counts, and everything consumed before and after the resume is exactly what the
uninterrupted epoch consumes, plus the repeats the resumed plans count (a repeat only when no batch could be
split). When the remaining batches divide evenly, the resumed batches are the uninterrupted run's own
batches in their global order: rank r' of W' takes global batch (b x W) + k x W' + r'."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from higgs_ds.stream import elastic
from higgs_ds.stream import plan as new
from tests.reference import plan_v1 as old
from tests.test_plan_equality import _case


def _reference(olds, settings, seed, epoch, world):
    """Every rank's batches of the uninterrupted epoch, from the reference plan; None when it refuses."""
    cfg = old.BatchingConfig(**settings)
    try:
        plans = [old.plan_epoch(olds, cfg, seed=seed, epoch=epoch, rank=r, world_size=world) for r in range(world)]
    except old.PlanError.__mro__[1]:
        return None
    return [p.batches for p in plans]


def _samples(batches) -> Counter:
    return Counter(pos for batch in batches for pos in batch)


def _resume(olds, settings, seed, epoch, segments, world):
    layout = new.EpochLayout(olds, new.BatchingConfig(**settings), seed=seed, epoch=epoch, world_size=segments[0][0])
    return [elastic.resumed_plan(layout, segments, r, world) for r in range(world)]


def _check_budget(plans, settings, olds):
    if not settings["max_tokens"]:
        return
    for plan in plans:
        for batch, longest in zip(plan.batches, _longest(plan)):
            assert len(batch) * longest <= settings["max_tokens"] or len(batch) == 1


def _longest(plan):
    starts = plan.batches.starts
    return [int(plan.lengths[a:b].max()) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("case", range(80))
def test_a_resume_on_other_ranks_consumes_exactly_the_rest_of_the_epoch(case):
    olds, _, settings, world, seed, epoch, rng = _case(case)
    whole = _reference(olds, settings, seed, epoch, world)
    if whole is None:
        return
    per_rank = len(whole[0])
    done = rng.randrange(per_rank)
    consumed = _samples(b for rank in whole for b in rank[:done])
    new_world = rng.choice([w for w in (1, 2, 3, 4, 5, 8) if w != world])
    plans = _resume(olds, settings, seed, epoch, [(world, done)], new_world)
    assert len({len(p.batches) for p in plans}) == 1, "every rank takes the same number of batches"
    after = _samples(b for p in plans for b in p.batches)
    repeats = sum(p.num_repeated for p in plans)
    assert consumed + after == _samples(b for rank in whole for b in rank) + _first_left(whole, done, repeats)
    _check_budget(plans, settings, olds)
    left = (per_rank - done) * world
    if left % new_world == 0:  # no split, no repeat: the uninterrupted run's batches, in global order
        assert repeats == 0 and sum(p.num_split for p in plans) == 0
        for r, p in enumerate(plans):
            want = [whole[g % world][g // world] for g in range(done * world + r, per_rank * world, new_world)]
            assert [list(b) for b in p.batches] == [list(b) for b in want]
    else:
        assert sum(p.num_split for p in plans) + repeats == new_world - left % new_world


def _first_left(whole, done, repeats) -> Counter:
    """The repeated sample: the first of what was left (global batch done x W is rank 0's batch `done`)."""
    return Counter({whole[0][done][0]: repeats}) if repeats else Counter()


@pytest.mark.parametrize("case", range(80, 120))
def test_two_resumes_in_one_epoch_consume_exactly_the_epoch(case):
    """W -> W' -> W'' within one epoch: the second resume continues from what the first plan's ranks took."""
    olds, _, settings, world, seed, epoch, rng = _case(case)
    whole = _reference(olds, settings, seed, epoch, world)
    if whole is None or len(whole[0]) < 2:
        return
    done = rng.randrange(1, len(whole[0]))
    second = rng.choice([1, 2, 3, 4, 8])
    middle = _resume(olds, settings, seed, epoch, [(world, done)], second)
    done2 = rng.randrange(len(middle[0].batches) + 1)
    third = rng.choice([1, 2, 4, 5])
    last = _resume(olds, settings, seed, epoch, [(world, done), (second, done2)], third)
    assert len({len(p.batches) for p in last}) == 1
    took = _samples(b for rank in whole for b in rank[:done]) + _samples(b for p in middle for b in p.batches[:done2])
    # the middle plan's repeats close its global sequence (the last R batches): the middle run took those of
    # them inside its first done2 x W' batches; the rest are still left and counted again by the last plan
    middle_repeats = sum(p.num_repeated for p in middle)
    took_repeats = max(0, done2 * second - (second * len(middle[0].batches) - middle_repeats))
    extra = took_repeats + sum(p.num_repeated for p in last)
    total = took + _samples(b for p in last for b in p.batches)
    want = _samples(b for rank in whole for b in rank)
    assert not want - total, "no sample of the epoch is skipped"
    assert sum((total - want).values()) == extra, "samples beyond the epoch's are the counted repeats"


def test_a_position_past_what_was_left_is_refused():
    olds, _, settings, world, seed, epoch, _ = _case(3)
    layout = new.EpochLayout(olds, new.BatchingConfig(**settings), seed=seed, epoch=epoch, world_size=world)
    with pytest.raises(new.PlanError, match="only .* were left"):
        elastic.resumed_plan(layout, [(world, layout.target + 1)], 0, 2)


def test_the_random_cases_split_repeat_and_deal_evenly():
    """The cases above reach all three outcomes of a resume: even, split and repeated."""
    seen = set()
    for case in range(80):
        olds, _, settings, world, seed, epoch, rng = _case(case)
        whole = _reference(olds, settings, seed, epoch, world)
        if whole is None:
            continue
        done = rng.randrange(len(whole[0]))
        new_world = rng.choice([w for w in (1, 2, 3, 4, 5, 8) if w != world])
        plans = _resume(olds, settings, seed, epoch, [(world, done)], new_world)
        seen |= {k for k, v in [("split", sum(p.num_split for p in plans)),
                                ("repeated", sum(p.num_repeated for p in plans))] if v}  # fmt: skip
        seen.add("even" if ((len(whole[0]) - done) * world) % new_world == 0 else "uneven")
    assert seen >= {"split", "repeated", "even", "uneven"}, seen


def test_the_chain_with_one_segment_is_the_plan_itself():
    rng = random.Random(1)
    for case in range(20):
        olds, _, settings, world, seed, epoch, _ = _case(case)
        if _reference(olds, settings, seed, epoch, world) is None:
            continue
        layout = new.EpochLayout(olds, new.BatchingConfig(**settings), seed=seed, epoch=epoch, world_size=world)
        rank = rng.randrange(world)
        resumed = elastic.resumed_plan(layout, [(world, 0)], rank, world)
        assert resumed.batches == layout.rank_plan(rank).batches


def _split_to_multiple(seq: list[list], world: int) -> list[list]:
    """The module's rule on lists: split the largest batches (ties: the earlier) in place until the count is a
    multiple of `world`; when none has two samples, add the first sample alone at the end."""
    while len(seq) % world:
        need = world - len(seq) % world
        big = sorted((k for k in range(len(seq)) if len(seq[k]) > 1), key=lambda k: -len(seq[k]))[:need]
        if not big:
            seq = seq + [[seq[0][0]]] * need
        for k in sorted(big, reverse=True):
            seq[k : k + 1] = [seq[k][: len(seq[k]) // 2], seq[k][len(seq[k]) // 2 :]]
    return seq


def _rest_by_lists(layout, segments, world):
    """Every old rank's own plan, read in global order (rank r's batch k is batch k x W + r), cut and
    split by the segments as lists."""
    plans = [layout.rank_plan(r) for r in range(layout.world)]
    seq = [list(plans[g % layout.world].batches[g // layout.world]) for g in range(layout.world * layout.target)]
    for i, (seg_world, done) in enumerate(segments):
        if i:
            seq = _split_to_multiple(seq, seg_world)
        seq = seq[seg_world * done :]
    return _split_to_multiple(seq, world)


@pytest.mark.parametrize("cloning", [False, True])
def test_a_resume_at_scale_deals_the_old_ranks_batches(cloning):
    """Thousands of samples on 16 ranks (budget batches packed by the vector path, cloning + mixing), resumed
    twice at other sizes: each rank's batches are those the old ranks' own plans give, cut as lists."""
    rng = np.random.default_rng(3)
    refs = []
    for s in range(24):
        lengths = (rng.integers(8, 256, 300) // 8 * 8).astype(np.int32)
        parts = np.stack([np.full(300, 8), lengths - 8], axis=1).astype(np.int32)
        refs.append(new.ShardRef(f"set{s % 2}/shard-{s}.tar", 300, lengths, dataset=s % 2,
                                 speakers=rng.integers(0, 9, 300).astype(np.int32), clone_parts=parts))  # fmt: skip
    mixing = {"weights": (1.0, 0.6), "clone_references": 0.4} if cloning else {}
    cfg = new.BatchingConfig(max_tokens=1024, max_length=384, window=64, **mixing)
    layout = new.EpochLayout(refs, cfg, seed=4, epoch=1, world_size=16)
    assert layout._packed is not None and 16 * -(-layout.per_rank // 64) >= new._VECTOR_WINDOWS
    segments = [(16, layout.target // 3), (11, 7)]
    for world in (5, 16):
        want = _rest_by_lists(layout, segments, world)
        for rank in range(world):
            got = elastic.resumed_plan(layout, segments, rank, world).batches
            assert [list(b) for b in got] == want[rank::world], (world, rank)
