"""Shard-set mixing weights (data.weights): how many times each shard directory is seen per epoch."""

import collections

import pytest

from higgs_ds.stream.loader import DataConfig, build_dataloader
from higgs_ds.stream.plan import BatchingConfig, PlanError, ShardRef, epoch_order, plan_epoch

# three sets: 10 samples in shards of 4+6, 8 samples in one shard, 6 samples in shards of 2+2+2
SIZES = [[4, 6], [8], [2, 2, 2]]
REFS = [
    ShardRef(f"set{d}/shard{k}.tar", n, tuple(16 * (1 + (i + k) % 5) for i in range(n)), dataset=d)
    for d, shards in enumerate(SIZES)
    for k, n in enumerate(shards)
]
WEIGHTS = (1.0, 0.5, 2.5)


def _per_set(positions) -> collections.Counter:
    return collections.Counter(REFS[s].dataset for s, _ in positions)


def test_each_set_is_seen_weight_times_per_epoch():
    for epoch in range(3):
        order, mix = epoch_order(REFS, 7, epoch, WEIGHTS)
        assert _per_set(order) == {0: 10, 1: 4, 2: 15}
        times = collections.Counter(order)
        assert {times[(s, i)] for s, r in enumerate(REFS) if r.dataset == 0 for i in range(r.num_samples)} == {1}
        assert set(times[p] for p in times if REFS[p[0]].dataset == 1) == {1}  # a half: 4 of 8, once each
        assert sorted(times[p] for p in times if REFS[p[0]].dataset == 2) == [2, 2, 2, 3, 3, 3]
        assert mix == [
            {"set": 0, "weight": 1.0, "samples": 10, "drawn": 10, "repeated": 0, "left_out": 0},
            {"set": 1, "weight": 0.5, "samples": 8, "drawn": 4, "repeated": 0, "left_out": 4},
            {"set": 2, "weight": 2.5, "samples": 6, "drawn": 15, "repeated": 9, "left_out": 0},
        ]
    halves = {frozenset(p for p in epoch_order(REFS, 7, e, WEIGHTS)[0] if p[0] == 2) for e in range(6)}
    assert len(halves) > 1  # the half is chosen anew each epoch
    assert epoch_order(REFS, 7, 1, WEIGHTS) == epoch_order(REFS, 7, 1, WEIGHTS)  # from (seed, epoch) alone


def test_weights_of_one_give_the_unweighted_order():
    for epoch in range(3):
        assert epoch_order(REFS, 3, epoch, (1.0, 1.0, 1.0))[0] == epoch_order(REFS, 3, epoch)[0]
    assert epoch_order(REFS, 3, 0, (0.0, 1.0, 0.0))[0] == [p for p in epoch_order(REFS, 3, 0)[0] if p[0] == 2]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batching", [BatchingConfig(batch_size=3), BatchingConfig(max_tokens=200)])
def test_equal_batches_on_every_rank_with_the_weighted_samples(world_size, batching):
    from dataclasses import replace

    cfg = replace(batching, weights=WEIGHTS)
    plans = [plan_epoch(REFS, cfg, seed=2, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(p.batches) for p in plans}) == 1
    read = collections.Counter(p for plan in plans for b in plan.batches for p in b)
    order = collections.Counter(epoch_order(REFS, 2, 1, WEIGHTS)[0])
    assert all(read[p] >= n for p, n in order.items()) and set(read) == set(order)
    assert sum(read.values()) - sum(order.values()) == sum(p.num_repeated for p in plans)  # padding, counted
    assert plans[0].mix[2]["drawn"] == 15


@pytest.mark.parametrize(
    "weights, message",
    [
        ((1.0, 2.0), "2 values for 3 shard directories"),
        ((1.0, -1.0, 1.0), r"data.weights\[1\] = -1.0.*>= 0"),
        ((1.0, float("nan"), 1.0), r"data.weights\[1\] = nan"),
        ((0.0, 0.0, 0.0), "all 0"),
    ],
)
def test_bad_weights_say_what_to_change(weights, message):
    with pytest.raises(PlanError, match=message):
        plan_epoch(REFS, BatchingConfig(weights=weights), seed=0, epoch=0, rank=0, world_size=1)
    with pytest.raises(PlanError, match=message):  # when the config is made, before any shard is read
        DataConfig(shards=["a", "b", "c"], weights=list(weights))


def test_the_stream_reads_the_weighted_sets_with_equal_batches_and_exact_resume(small_shards, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok, config = AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
    base = dict(shards=[str(small_shards), str(small_shards)], weights=[1.5, 0.25], batch_size=2, seed=1)
    counts, ids = [], []
    for world_size in (1, 2, 3):
        per_rank = []
        for rank in range(world_size):
            loader = build_dataloader(DataConfig(**base), tok, config, rank=rank, world_size=world_size)
            per_rank.append([b["sample_ids"] for b in loader])
        counts.append({len(b) for b in per_rank})
        ids.append(sum(len(batch) for batches in per_rank for batch in batches))
    assert all(len(c) == 1 for c in counts)
    assert ids == [14, 14, 15]  # 8 x 1.5 + 8 x 0.25 = 14 samples, padded to a multiple of the ranks
    loader = build_dataloader(DataConfig(**base, num_workers=2), tok, config, rank=1, world_size=2)
    whole = [b["sample_ids"] for b in loader]
    loader.seek(epoch=0)
    it = iter(loader)
    first = [next(it)["sample_ids"] for _ in range(2)]
    state = loader.state_dict()
    del it
    resumed = build_dataloader(DataConfig(**base), tok, config, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert first + [b["sample_ids"] for b in resumed] == whole
    changed = build_dataloader(DataConfig(**(base | {"weights": [1.0, 1.0]})), tok, config, rank=1, world_size=2)
    with pytest.raises(PlanError, match="data.weights"):
        changed.load_state_dict(state)


def test_a_trailing_directory_without_shards_keeps_its_weight():
    """data.shards may end in a directory whose index lists no shard: its weight is valid, it adds nothing."""
    plan = plan_epoch(REFS, BatchingConfig(weights=(*WEIGHTS, 1.0)), seed=0, epoch=0, rank=0, world_size=1)
    assert _per_set(p for b in plan.batches for p in b) == {0: 10, 1: 4, 2: 15}
