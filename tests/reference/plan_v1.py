"""Reference: the epoch plan as higgs-ds computed it up to session 4 (Python lists and tuples, every rank
computing every rank's batches). higgs_ds.stream.plan computes the same plan with arrays, one rank's share
only; tests/test_plan_equality.py and bench/scale.py compare the two. Kept unchanged as the definition.

The epoch plan: which micro-batches each rank reads in an epoch, decided from the shard indexes alone.

Because the plan is a pure function of (indexes, seed, epoch, world size, batching settings), every rank
computes every rank's plan without communicating, and:

* the global sample order is fixed by (seed, epoch): shards in a shuffled order, samples shuffled within
  each shard; it does not depend on the number of dataloader workers;
* with mixing weights (one per shard directory), a directory of weight w is seen w times per epoch: each
  whole pass is a full pass over its shards, the fractional rest a (seed, epoch)-chosen subset of
  round(frac x size) samples (a different subset every epoch); repeats and left-out samples are counted
  per directory (`EpochPlan.mix`);
* with `clone_references`, that fraction of the plain single-speaker TTS samples gets a voice-cloning
  reference: another sample of the same speaker in the same directory, chosen from (seed, epoch); the
  plan knows the assembled sample's expanded length (from the index's clone_parts) before the epoch, so
  budget batching and the length limits see it; samples whose speaker has no other sample stay plain
  and are counted (`EpochPlan.clone`);
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

import bisect
import math
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
    dataset: int = 0
    """Which shard directory (data set) the shard belongs to: mixing weights and cloning references are
    per directory."""
    speakers: tuple[str | None, ...] | None = None
    """Speaker of each sample; None for an index written before speakers were recorded."""
    clone_parts: tuple | None = None
    """Per sample, None (not a plain single-speaker TTS sample) or (head, pair): the unrounded expanded
    positions of its system turn and of its user + assistant turns (None, None without --tokenizer)."""


@dataclass(frozen=True)
class BatchingConfig:
    batch_size: int = 2
    max_tokens: int | None = None
    max_length: int | None = None
    window: int = 512
    """Samples sorted by length together before packing: larger packs tighter, smaller mixes more."""
    weights: tuple[float, ...] | None = None
    """Per data set (ShardRef.dataset): how many times its samples are seen per epoch (None: once each)."""
    clone_references: float = 0.0
    """Fraction of plain single-speaker TTS samples that get a reference of the same speaker."""


@dataclass
class EpochPlan:
    batches: list[list[Position]]
    num_global: int
    num_repeated: int = 0
    num_dropped: int = 0
    num_split: int = 0
    dropped: list[Position] = field(default_factory=list)
    references: dict[Position, Position] = field(default_factory=dict)
    """Voice-cloning reference of each sample that has one (the same for every occurrence in the epoch)."""
    mix: list[dict] = field(default_factory=list)
    """Per data set with weights: weight, samples, drawn, repeated (drawn beyond one each), left_out."""
    clone: dict = field(default_factory=dict)
    """With clone_references: eligible, drawn, cloned, lonely (speaker has no other sample), too_long."""

    def real_position_fraction(self, refs: list[ShardRef]) -> float | None:
        if any(r.lengths is None for r in refs):
            return None
        length = _length_fn(refs, self.references)
        real = sum(length(p) for b in self.batches for p in b)
        padded = sum(len(b) * max(length(p) for p in b) for b in self.batches)
        return real / padded if padded else None


def check_weights(weights, num_sets: int) -> None:
    """Mixing weights: one finite, non-negative number per shard directory, not all zero."""
    if weights is None:
        return
    if len(weights) != num_sets:
        raise PlanError(
            f"data.weights has {len(weights)} values for {num_sets} shard directories (data.shards): "
            "give one weight per directory, in the same order"
        )
    for j, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise PlanError(
                f"data.weights[{j}] = {w!r}: a weight is how many times that directory's samples are seen per "
                "epoch, a finite number >= 0 (0 leaves it out, 0.5 a half, 2 twice)"
            )
    if not any(weights):
        raise PlanError("data.weights are all 0: nothing to train on; give at least one directory a weight > 0")


def check_clone_fraction(fraction) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise PlanError(
            f"data.clone_references = {fraction!r}: it is the fraction (0 to 1) of plain single-speaker TTS "
            "samples that get a voice-cloning reference"
        )


def _units(refs: list[ShardRef], seed: int, epoch: int, weights) -> tuple[list, list[dict]]:
    """The epoch's passes over shards as (shard, pass, chosen sample numbers or None for all), pass 0 of
    every shard first (so without weights the order is the unweighted one), and per-set counts."""
    if weights is None:
        return [(s, 0, None) for s in range(len(refs))], []
    by_set: dict[int, list[int]] = {}
    for s, r in enumerate(refs):
        by_set.setdefault(r.dataset, []).append(s)
    partial: dict[int, list[int]] = {}  # shard -> chosen samples of its set's fractional pass
    whole: dict[int, int] = {}
    mix = []
    for d in sorted(by_set):
        w = float(weights[d])
        full = math.floor(w)
        shards = by_set[d]
        size = sum(refs[s].num_samples for s in shards)
        take = round((w - full) * size)
        offsets = [0]
        for s in shards:
            offsets.append(offsets[-1] + refs[s].num_samples)
        # a (seed, epoch)-chosen subset of the set: a different one each epoch, so all are seen over epochs
        for flat in sorted(random.Random(f"{seed}/{epoch}/mix/{d}").sample(range(size), take)):
            k = bisect.bisect_right(offsets, flat) - 1  # the shard holding the set's flat sample number
            partial.setdefault(shards[k], []).append(flat - offsets[k])
        for s in shards:
            whole[s] = full
        unique = size if full else take
        drawn = full * size + take
        mix.append(
            {
                "set": d,
                "weight": w,
                "samples": size,
                "drawn": drawn,
                "repeated": drawn - unique,
                "left_out": size - unique,
            }
        )
    units = []
    for p in range(max(whole.values(), default=0) + 1):
        for s in range(len(refs)):
            if p < whole[s]:
                units.append((s, p, None))
            elif p == whole[s] and s in partial:
                units.append((s, p, partial[s]))
    return units, mix


def epoch_order(refs: list[ShardRef], seed: int, epoch: int, weights=None) -> tuple[list[Position], list[dict]]:
    """The epoch's global sample order (with each set's weight applied) and the per-set mixing counts."""
    units, mix = _units(refs, seed, epoch, weights)
    rng = random.Random(f"{seed}/{epoch}")
    shuffled = list(range(len(units)))
    rng.shuffle(shuffled)
    order = []
    for u in shuffled:
        s, p, chosen = units[u]
        inner = list(range(refs[s].num_samples)) if chosen is None else list(chosen)
        random.Random(f"{seed}/{epoch}/{s}" if p == 0 else f"{seed}/{epoch}/{s}/{p}").shuffle(inner)
        order += [(s, i) for i in inner]
    return order, mix


def global_order(refs: list[ShardRef], seed: int, epoch: int) -> list[Position]:
    return epoch_order(refs, seed, epoch)[0]


def _length(refs, pos: Position) -> int:
    return refs[pos[0]].lengths[pos[1]]


def clone_length(refs: list[ShardRef], pos: Position, ref: Position) -> int:
    """Expanded length of sample `pos` with `ref` as its reference: its system turn, the reference's user
    and assistant turns, its own user and assistant turns, rounded up to 8 like expanded_length."""
    head, pair = refs[pos[0]].clone_parts[pos[1]]
    n = head + pair + refs[ref[0]].clone_parts[ref[1]][1]
    return -(-n // 8) * 8


def _length_fn(refs, references: dict):
    if not references:
        return lambda pos: _length(refs, pos)
    return lambda pos: clone_length(refs, pos, references[pos]) if pos in references else _length(refs, pos)


def choose_references(refs: list[ShardRef], order: list[Position], fraction: float, seed: int, epoch: int, limit):
    """Each eligible sample of the epoch draws (from (seed, epoch) and its place in its set's index) whether
    it gets a reference and which other sample of its speaker it is; a pair longer than `limit` stays
    plain. Returns (references, counts)."""
    counts = {"eligible": 0, "drawn": 0, "cloned": 0, "lonely": 0, "too_long": 0}
    references: dict[Position, Position] = {}
    if not fraction:
        return references, counts
    missing = next((r.path for r in refs if r.speakers is None or r.clone_parts is None), None)
    if missing:
        raise PlanError(
            f"data.clone_references needs each sample's speaker in the index, which {missing}'s index "
            "lacks (built by an older higgs-ds): rebuild the shards with this version of `higgs-ds shards build`"
        )
    unsized = next((r.path for r in refs if r.lengths is not None and (None, None) in r.clone_parts), None)
    if unsized:
        raise PlanError(
            f"{unsized}'s index has expanded lengths but not those of its turns (clone_parts), which planning "
            "with references needs: rebuild the shards with `higgs-ds shards build --tokenizer MODEL`"
        )
    groups: dict[tuple[int, str], list[Position]] = {}
    for s, r in enumerate(refs):
        for i, parts in enumerate(r.clone_parts):
            if parts is not None:
                groups.setdefault((r.dataset, r.speakers[i]), []).append((s, i))
    present = set(order)
    streams: dict[int, random.Random] = {}
    for (d, _), group in sorted(groups.items(), key=lambda g: g[1][0]):  # sets and speakers in index order
        rng = streams.setdefault(d, random.Random(f"{seed}/{epoch}/clone/{d}"))
        for own, pos in enumerate(group):
            draw, pick = rng.random(), rng.random()  # always both: a sample's draw does not depend on others
            if pos not in present:
                continue
            counts["eligible"] += 1
            if draw >= fraction:
                continue
            counts["drawn"] += 1
            if len(group) < 2:
                counts["lonely"] += 1
                continue
            j = int(pick * (len(group) - 1))
            ref = group[j if j < own else j + 1]  # any other sample of the speaker, never itself
            if limit is not None and refs[pos[0]].lengths is not None and clone_length(refs, pos, ref) > limit:
                counts["too_long"] += 1
                continue
            references[pos] = ref
            counts["cloned"] += 1
    return references, counts


def _fixed_batches(positions: list[Position], size: int) -> list[list[Position]]:
    return [positions[i : i + size] for i in range(0, len(positions), size)]


def _budget_batches(positions, length, cfg: BatchingConfig, rng: random.Random) -> list[list[Position]]:
    """Length-sorted windows packed greedily under max_tokens (padded rectangle), batches then shuffled."""
    batches = []
    step = cfg.window
    for start in range(0, len(positions), step):
        window = sorted(positions[start : start + step], key=length)
        current: list[Position] = []
        for pos in window:
            if current and (len(current) + 1) * length(pos) > cfg.max_tokens:
                batches.append(current)
                current = []
            current.append(pos)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def _rank_batches(order, length, cfg: BatchingConfig, rank: int, world: int, seed: int, epoch: int):
    per_rank = -(-len(order) // world)
    repeats = per_rank * world - len(order)
    padded = order + [order[i % len(order)] for i in range(repeats)]
    mine = padded[rank * per_rank : (rank + 1) * per_rank]
    repeats = max(0, (rank + 1) * per_rank - max(len(order), rank * per_rank))  # padding in this rank's block
    if cfg.max_tokens:
        return _budget_batches(mine, length, cfg, random.Random(f"{seed}/{epoch}/batches/{rank}")), repeats
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
    # data.shards may end in directories without shards; DataConfig checks the weights' count exactly
    check_weights(cfg.weights, max(max((r.dataset for r in refs), default=-1) + 1, len(cfg.weights or ())))
    check_clone_fraction(cfg.clone_references)
    order, mix = epoch_order(refs, seed, epoch, cfg.weights)
    limit = min(x for x in (cfg.max_tokens, cfg.max_length, 1 << 62) if x)
    references, clone = choose_references(refs, order, cfg.clone_references, seed, epoch, limit)
    length = _length_fn(refs, references)
    kept = [p for p in order if refs[p[0]].lengths is None or length(p) <= limit]
    dropped = [p for p in order if refs[p[0]].lengths is not None and length(p) > limit]
    if len(kept) < world_size:
        raise PlanError(f"the shards hold {len(kept)} usable samples, fewer than the {world_size} ranks")
    every = [_rank_batches(kept, length, cfg, r, world_size, seed, epoch) for r in range(world_size)]
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
        references=references,
        mix=mix,
        clone=clone if cfg.clone_references else {},
    )


def batches_for_worker(batches: list, worker: int, num_workers: int) -> list:
    """Worker `worker`'s share, in the round-robin order a DataLoader merges worker outputs in."""
    return batches[worker::num_workers]
