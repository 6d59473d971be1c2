"""The array plan (higgs_ds.stream.plan) equals the list plan it replaced (tests/reference/plan_v1.py, the
definition every earlier higgs-ds trained with) on randomized configurations: every rank's batches, the
counts, what was dropped, every cloning reference, the mixing counts, the refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest

from higgs_ds.stream import plan as new
from higgs_ds.stream import pydraws, pyrandom
from tests.reference import plan_v1 as old


def _shards(rng: random.Random, sized: bool):
    """ShardRefs of both modules for the same random shard set (speakers, lengths, turn lengths)."""
    sets = rng.randint(1, 3)
    speakers = [f"spk{k}" for k in range(rng.randint(1, 6))]
    specs = []
    for s in range(rng.randint(1, 7)):
        n = rng.choice([1, 2, 5, 13, 40, 90])
        spk = [rng.choice(speakers + [None]) for _ in range(n)]
        parts = [None if x is None else (rng.randint(4, 60), rng.randint(20, 300)) for x in spk]
        lengths = [rng.randint(16, 360) if p is None else -(-sum(p) // 8) * 8 for p in parts]
        specs.append((f"set{s % sets}/shard-{s}.tar", n, lengths if sized else None, s % sets, spk, parts))
    olds = [old.ShardRef(p, n, tuple(ln) if ln else None, d, tuple(sp), tuple(pa)) for p, n, ln, d, sp, pa in specs]
    return olds, specs, sets


def _as_arrays(specs):
    """The same shards as higgs_ds.stream.reader gives them: int arrays, speaker ids per directory."""
    tables: dict[int, dict] = {}
    refs = []
    for path, n, lengths, d, spk, parts in specs:
        table = tables.setdefault(d, {})
        ids = np.array([-1 if x is None else table.setdefault(x, len(table)) for x in spk], dtype=np.int32)
        cp = np.array([(-1, -1) if p is None else p for p in parts], dtype=np.int32).reshape(-1, 2)
        arr = np.asarray(lengths, dtype=np.int32) if lengths else None
        refs.append(new.ShardRef(path, n, arr, dataset=d, speakers=ids, clone_parts=cp))
    return refs


def _config(rng: random.Random, sets: int, sized: bool):
    budget = sized and rng.random() < 0.6
    weights = None
    if rng.random() < 0.5:
        weights = tuple(rng.choice([0.0, 0.3, 0.5, 1.0, 1.0, 1.7, 2.0]) for _ in range(sets))
        if not any(weights):
            weights = (1.0,) + weights[1:]
    return dict(
        batch_size=rng.randint(1, 5),
        max_tokens=rng.choice([400, 700, 1500]) if budget else None,
        max_length=rng.choice([None, 250, 330]) if sized else None,
        window=rng.choice([1, 2, 3, 7, 512]),
        weights=weights,
        clone_references=rng.choice([0.0, 0.0, 0.4, 1.0]),
    )


def _outcome(module, refs, cfg, seed, epoch, rank, world):
    try:
        plan = module.plan_epoch(refs, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world)
    except old.PlanError.__mro__[1] as err:  # UserError: the refusal must be the same, word for word
        return ("refused", str(err))
    return {
        "batches": [list(b) for b in plan.batches],
        "counts": (plan.num_global, plan.num_repeated, plan.num_dropped, plan.num_split),
        "dropped": list(plan.dropped),
        "references": dict(plan.references.items()),
        "mix": plan.mix,
        "clone": plan.clone,
        "real": plan.real_position_fraction(refs),
    }


def _case(case: int):
    """Random case number `case`: shards (both forms), batching settings, world size, seed, epoch, rng."""
    rng = random.Random(case)
    sized = rng.random() < 0.8
    olds, specs, sets = _shards(rng, sized)
    settings = _config(rng, sets, sized)
    world = rng.choice([1, 2, 3, 4, 8])
    seed, epoch = rng.randint(0, 99), rng.randint(0, 3)
    return olds, specs, settings, world, seed, epoch, rng


@pytest.mark.parametrize("case", range(160))
def test_array_plan_equals_the_list_plan(case):
    olds, specs, settings, world, seed, epoch, rng = _case(case)
    old_cfg = old.BatchingConfig(**settings)
    new_cfg = new.BatchingConfig(**settings)
    for rank in sorted({0, world - 1, rng.randrange(world)}):
        want = _outcome(old, olds, old_cfg, seed, epoch, rank, world)
        assert _outcome(new, olds, new_cfg, seed, epoch, rank, world) == want, (settings, world, rank)
        assert _outcome(new, _as_arrays(specs), new_cfg, seed, epoch, rank, world) == want, (settings, rank)


def test_the_random_cases_reach_every_branch():
    """The cases above refuse some plans, drop, clone, split, repeat and pack by vector and by loop."""
    seen = set()
    for case in range(160):
        olds, _, settings, world, seed, epoch, _ = _case(case)
        got = _outcome(old, olds, old.BatchingConfig(**settings), seed, epoch, world - 1, world)  # padded last
        if isinstance(got, tuple):
            seen.add("refused")
            continue
        seen |= {k for k, v in [("dropped", got["dropped"]), ("cloned", got["references"]), ("mixed", got["mix"]),
                                ("split", got["counts"][3]), ("repeated", got["counts"][1])] if v}  # fmt: skip
        if settings["max_tokens"]:
            layout = new.EpochLayout(olds, new.BatchingConfig(**settings), seed=seed, epoch=epoch, world_size=world)
            windows = world * -(-layout.per_rank // min(settings["window"], layout.per_rank))
            seen.add("vector" if windows >= new._VECTOR_WINDOWS else "loop")
    assert seen >= {"refused", "dropped", "cloned", "mixed", "split", "repeated", "vector", "loop"}, seen


def test_cpython_streams_drawn_with_numpy_are_cpythons():
    for key in ["0/0/clone/0", "7/3/clone/2", "x"]:
        r = random.Random(key)
        assert pyrandom.random_floats(key, 500).tolist() == [r.random() for _ in range(500)]
        for n in [0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 33, 100, 1000, 1024, 1025]:
            x = list(range(100, 100 + n))
            random.Random(key).shuffle(x)
            assert pyrandom.shuffled(key, range(100, 100 + n)).tolist() == x


@pytest.mark.parametrize("key", ["0/0/mix/1", "x"])
def test_the_sample_set_is_cpythons_random_sample(key):
    """Both of random.sample's branches: k = 500 of 1000 fills a pool (a list of 1000 is smaller than a set
    of 500); k <= 5, or 8,000 of 100,000, draws with a set of repeats (there the two branches' results differ,
    so taking the wrong one fails); k = 0 and k = n; random sizes."""
    rng = random.Random(key)
    cases = [(0, 0), (1, 0), (1, 1), (2, 2), (7, 3), (1000, 500), (1000, 5), (1000, 1000), (100_000, 8000),
             (50_000, 2000), (4097, 2048)]  # fmt: skip
    cases += [(n, rng.randint(0, n)) for n in (rng.randint(1, 50_000) for _ in range(30))]
    cases += [(n, rng.randint(0, n // 20)) for n in (rng.randint(100, 50_000) for _ in range(30))]
    for n, k in cases:
        want = sorted(random.Random(key).sample(range(n), k))
        assert pydraws.sample_set(key, n, k).tolist() == want, (n, k)


def _equalise_loop(segments, target):
    """The definition (the plan's loop before it was vectorised): split the largest batch (the first of the
    largest) in place until there are `target`; when none has two samples, add the first sample alone."""
    segments, splits, repeats = list(segments), 0, 0
    while len(segments) < target:
        largest = max(range(len(segments)), key=lambda k: segments[k][1] - segments[k][0])
        a, b = segments[largest]
        if b - a > 1:
            segments[largest : largest + 1] = [(a, a + (b - a) // 2), (a + (b - a) // 2, b)]
            splits += 1
        else:
            segments.append((segments[0][0], segments[0][0] + 1))
            repeats += 1
    return segments, splits, repeats


@pytest.mark.parametrize("seed", range(40))
def test_equalising_all_ranks_at_once_is_the_loop_per_rank(seed):
    """Random batch sizes per rank (ties, sizes of one, ranks that need no split, need more than can split)."""
    rng = random.Random(seed)
    ranks = [[rng.choice([1, 1, 2, 3, 4, 7, 8, 16, 33, 64]) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    target = max(len(r) for r in ranks) + rng.choice([0, 1, 3, 10, 40, 200])
    group, a, b = [], [], []
    for g, sizes in enumerate(ranks):
        ends = np.cumsum(sizes)
        group += [g] * len(sizes)
        a += (ends - sizes).tolist()
        b += ends.tolist()
    spans = new._equalise_spans(np.array(group), np.array(a), np.array(b), len(ranks), target)
    for g, sizes in enumerate(ranks):
        ends = np.cumsum(sizes).tolist()
        want, splits, repeats = _equalise_loop(zip([0] + ends[:-1], ends), target)
        mine = spans.group == g
        assert list(zip(spans.a[mine].tolist(), spans.b[mine].tolist())) == want, (sizes, target)
        assert (spans.splits[g], spans.repeats[g]) == (splits, repeats)


def test_preflight_totals_equal_the_sum_over_ranks():
    rng = random.Random(5)
    olds, _, sets = _shards(rng, True)
    cfg = new.BatchingConfig(max_tokens=700, window=3, clone_references=0.5)
    for world in (1, 3, 8):
        layout = new.EpochLayout(olds, cfg, seed=1, epoch=0, world_size=world)
        plans = [old.plan_epoch(olds, old.BatchingConfig(**vars(cfg)), seed=1, epoch=0, rank=r, world_size=world)
                 for r in range(world)]  # fmt: skip
        assert layout.total_repeated() == sum(p.num_repeated for p in plans)
        assert layout.target == len(plans[0].batches)


@pytest.mark.parametrize("top", [5, 70_000, 1 << 33])
def test_the_radix_argsort_is_numpys_stable_argsort(top):
    """One 16-bit pass, two, and the int64 sort; by rows (the windows' sort) and flat (speaker keys)."""
    rng = np.random.default_rng(top)
    for shape in [(0,), (1000,), (7, 300)]:
        keys = rng.integers(0, top, shape)
        assert (new._stable_argsort(keys) == np.argsort(keys, axis=-1, kind="stable")).all(), shape
