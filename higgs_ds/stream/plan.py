"""The epoch plan: which micro-batches each rank reads in an epoch, decided from the shard indexes alone.

Because the plan is a pure function of (indexes, seed, epoch, world size, batching settings), every rank
computes its plan without communicating, and:

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

How, for millions of samples and a thousand ranks: the per-sample facts are flat numpy arrays (`_Samples`);
the global order is built once per process (CPython's shuffles, 0.25 us a sample, so that the order is the
one every earlier higgs-ds computed: tests/reference/plan_v1.py is that definition and
tests/test_plan_equality.py compares); the cloning draws are vectorised (higgs_ds.stream.pyrandom); how many
budget batches every rank forms, which fixes the equal count, is one vector step per window position for
all ranks' windows at once (`_pack_windows`); only this rank's batches become Python objects. The plan's
batches and references are arrays (`Batches`, `References`), so forked dataloader workers share them.
`EpochLayout` holds the all-ranks part, so `preflight` costs O(samples + ranks), not a plan per rank.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.stream.pydraws import float_chunks, sample_set
from higgs_ds.stream.pyrandom import shuffled

Position = tuple[int, int]  # (shard number in the shard list, sample number in the shard)
NO_LIMIT = 1 << 62
# Below this many length-sorted windows in all, packing walks the samples in Python instead of stepping
# all windows together (one vector step per position costs ~10 us whatever the number of windows).
_VECTOR_WINDOWS = 64


class PlanError(UserError):
    pass


@dataclass(frozen=True)
class ShardRef:
    path: str
    num_samples: int
    lengths: tuple[int, ...] | None = None
    """Expanded length of each sample (from a build with --tokenizer), in shard order (tuple or array)."""
    dataset: int = 0
    """Which shard directory (data set) the shard belongs to: mixing weights and cloning references are
    per directory."""
    speakers: tuple[str | None, ...] | None = None
    """Speaker of each sample (strings with None, or int ids into the directory's table with -1 for none);
    None for an index written before speakers were recorded."""
    clone_parts: tuple | None = None
    """Per sample, None (not a plain single-speaker TTS sample) or (head, pair): the unrounded expanded
    positions of its system turn and of its user + assistant turns (None, None without --tokenizer). As an
    (n, 2) int array: rows (-1, -1) for None and (-2, -2) for (None, None)."""


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


class Batches(Sequence):
    """Micro-batches held as arrays: `pairs` (n x 2: shard, sample) and `starts` (batch k is rows
    starts[k]:starts[k + 1]); `ids` selects and orders batches (a worker's share). Indexing gives a list
    of (shard, sample) tuples. Arrays, not lists of tuples, so forked workers do not copy the plan."""

    def __init__(self, pairs: np.ndarray, starts: np.ndarray, ids: np.ndarray | None = None):
        self.pairs, self.starts = pairs, starts
        self.ids = np.arange(len(starts) - 1) if ids is None else ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Batches(self.pairs, self.starts, self.ids[k])
        b = int(self.ids[k])
        return [(int(s), int(i)) for s, i in self.pairs[self.starts[b] : self.starts[b + 1]].tolist()]

    def sizes(self) -> np.ndarray:
        return (self.starts[1:] - self.starts[:-1])[self.ids]

    def __eq__(self, other) -> bool:
        if not isinstance(other, (Batches, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(list(a) == list(b) for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Batches({len(self)} micro-batches)"


class References(Mapping):
    """Position -> its voice-cloning reference, as two sorted flat arrays (shared by forked workers)."""

    def __init__(self, samples: "_Samples", keys: np.ndarray, values: np.ndarray):
        self.samples, self.flat_keys, self.flat_values = samples, keys, values

    def _find(self, pos) -> int:
        s, i = pos
        if not (0 <= s < len(self.samples.starts) - 1 and 0 <= i < self.samples.sizes[s]):
            return -1
        flat = self.samples.starts[s] + i
        k = int(np.searchsorted(self.flat_keys, flat))
        return k if k < len(self.flat_keys) and self.flat_keys[k] == flat else -1

    def __getitem__(self, pos) -> Position:
        k = self._find(pos)
        if k < 0:
            raise KeyError(pos)
        return self.samples.position(int(self.flat_values[k]))

    def __contains__(self, pos) -> bool:
        return isinstance(pos, tuple) and len(pos) == 2 and self._find(pos) >= 0

    def __iter__(self):
        return (self.samples.position(int(f)) for f in self.flat_keys)

    def __len__(self) -> int:
        return len(self.flat_keys)


@dataclass
class EpochPlan:
    batches: Batches
    num_global: int
    num_repeated: int = 0
    num_dropped: int = 0
    num_split: int = 0
    dropped: list[Position] = field(default_factory=list)
    references: Mapping = field(default_factory=dict)
    """Voice-cloning reference of each sample that has one (the same for every occurrence in the epoch)."""
    mix: list[dict] = field(default_factory=list)
    """Per data set with weights: weight, samples, drawn, repeated (drawn beyond one each), left_out."""
    clone: dict = field(default_factory=dict)
    """With clone_references: eligible, drawn, cloned, lonely (speaker has no other sample), too_long."""
    lengths: np.ndarray | None = None
    """Expanded length (with its reference) of each row of batches.pairs; None without lengths."""

    def real_position_fraction(self, refs: list[ShardRef] | None = None) -> float | None:
        if self.lengths is None:
            return None
        every = self.batches.starts
        if len(every) < 2:
            return None
        ids = self.batches.ids  # per batch of the whole plan, then the selected ones
        longest = np.maximum.reduceat(self.lengths, every[:-1])[ids]
        real = np.add.reduceat(self.lengths, every[:-1])[ids]
        padded = int((self.batches.sizes() * longest).sum())
        return int(real.sum()) / padded if padded else None


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


class _Samples:
    """Every sample of every shard as one flat numbering (shard order, then sample order), with the
    index's per-sample facts as arrays: expanded lengths, speaker keys, clone parts."""

    def __init__(self, refs: list[ShardRef]):
        self.refs = refs
        self.sizes = np.array([r.num_samples for r in refs], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.dataset = np.array([r.dataset for r in refs], dtype=np.int64)
        self.missing_lengths = next((r.path for r in refs if r.lengths is None), None)
        self.lengths = None if self.missing_lengths else _concat([np.asarray(r.lengths) for r in refs])

    def position(self, flat: int) -> Position:
        s = int(np.searchsorted(self.starts, flat, side="right")) - 1
        return (s, int(flat - self.starts[s]))

    def positions(self, flat: np.ndarray) -> np.ndarray:
        """(n, 2) array of (shard, sample) for flat numbers."""
        s = np.searchsorted(self.starts, flat, side="right") - 1
        return np.stack([s, flat - self.starts[s]], axis=1)

    def dataset_of_samples(self) -> np.ndarray:
        """Per sample, its data set (the smallest int type that holds them: 1 byte a sample)."""
        small = np.int8 if len(self.dataset) == 0 or self.dataset.max() < 127 else np.int64
        return np.repeat(self.dataset.astype(small), self.sizes)

    def speaker_keys(self, flat: np.ndarray) -> np.ndarray:
        """For these samples, a number >= 0 equal for two samples exactly when they have the same directory and
        speaker: the speaker's key within its directory (its id + 1 in the directory's table; 0 for none)
        plus an offset per directory past the keys of the directories before it."""
        local, tables = [], {}
        for r in self.refs:
            spk = r.speakers
            if isinstance(spk, np.ndarray):
                local.append(spk)  # -1 (none) + 1 below -> 0
            else:
                table = tables.setdefault(r.dataset, {None: 0})
                local.append(np.array([table.setdefault(x, len(table)) for x in spk], dtype=np.int64) - 1)
        keys = _concat(local)[flat].astype(np.int64) + 1
        dataset = self.dataset_of_samples()[flat]
        top = np.zeros(int(self.dataset.max(initial=0)) + 1, dtype=np.int64)
        np.maximum.at(top, dataset, keys)
        offset = np.concatenate([[0], np.cumsum(top + 1)[:-1]])
        keys += offset[dataset]
        return keys

    def clone_parts(self) -> np.ndarray:
        """(n, 2) int32 (int64 from tuples): (head, pair); (-1, -1) not plain TTS; (-2, -2) plain but built
        without lengths."""
        parts = []
        for r in self.refs:
            cp = r.clone_parts
            if isinstance(cp, np.ndarray):
                parts.append(cp.reshape(-1, 2))
            else:
                parts.append(np.array([_part_row(p) for p in cp], dtype=np.int64).reshape(-1, 2))
        return _concat(parts).reshape(-1, 2)


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays as one, made once: int32 where every part is of 32 bits or fewer (the index's arrays are),
    else int64."""
    if not arrays:
        return np.zeros(0, dtype=np.int64)
    narrow = all(a.dtype.kind in "iub" and a.dtype.itemsize <= 4 and a.dtype != np.uint32 for a in arrays)
    return np.concatenate(arrays, dtype=np.int32 if narrow else np.int64, casting="unsafe")


def _part_row(p) -> tuple[int, int]:
    if p is None:
        return (-1, -1)
    head, pair = p
    return (-2, -2) if head is None else (head, pair)


def _units(samples: _Samples, seed: int, epoch: int, weights) -> tuple[list, list[dict]]:
    """The epoch's passes over shards as (shard, pass, chosen sample numbers or None for all), pass 0 of
    every shard first (so without weights the order is the unweighted one), and per-set counts."""
    refs = samples.refs
    if weights is None:
        return [(s, 0, None) for s in range(len(refs))], []
    by_set: dict[int, list[int]] = {}
    for s, r in enumerate(refs):
        by_set.setdefault(r.dataset, []).append(s)
    partial: dict[int, np.ndarray] = {}  # shard -> chosen samples of its set's fractional pass
    whole: dict[int, int] = {}
    mix = []
    for d in sorted(by_set):
        w = float(weights[d])
        full = math.floor(w)
        shards = by_set[d]
        size = int(samples.sizes[shards].sum())
        take = round((w - full) * size)
        offsets = np.concatenate([[0], np.cumsum(samples.sizes[shards])])
        # a (seed, epoch)-chosen subset of the set: a different one each epoch, so all are seen over epochs
        chosen = sample_set(f"{seed}/{epoch}/mix/{d}", size, take)  # sorted(random.Random(key).sample(...))
        # chosen is sorted: shard k's samples are one slice of it, between its offsets
        bounds = np.searchsorted(chosen, offsets).tolist()
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b > a:
                partial[shards[k]] = chosen[a:b] - offsets[k]
        for s in shards:
            whole[s] = full
        unique = size if full else take
        drawn = full * size + take
        mix.append({"set": d, "weight": w, "samples": size, "drawn": drawn, "repeated": drawn - unique,
                    "left_out": size - unique})  # fmt: skip
    units = []
    for p in range(max(whole.values(), default=0) + 1):
        for s in range(len(refs)):
            if p < whole[s]:
                units.append((s, p, None))
            elif p == whole[s] and s in partial:
                units.append((s, p, partial[s]))
    return units, mix


def _order(samples: _Samples, seed: int, epoch: int, weights) -> tuple[np.ndarray, list[dict]]:
    """The epoch's global order as flat sample numbers (with each set's weight applied), and the mixing
    counts: units in a (seed, epoch) order, each unit's samples shuffled by its own stream."""
    units, mix = _units(samples, seed, epoch, weights)
    shuffled_units = list(range(len(units)))
    random.Random(f"{seed}/{epoch}").shuffle(shuffled_units)
    parts = []
    for u in shuffled_units:
        s, p, chosen = units[u]
        inner = range(int(samples.sizes[s])) if chosen is None else chosen
        key = f"{seed}/{epoch}/{s}" if p == 0 else f"{seed}/{epoch}/{s}/{p}"
        parts.append(shuffled(key, inner) + samples.starts[s])
    if not parts:
        return np.zeros(0, dtype=np.int64), mix
    # flat sample numbers fit in int32 below 2^31 samples: half the memory of every array indexed by them
    flat = np.int32 if samples.starts[-1] < 1 << 31 else np.int64
    return np.concatenate(parts, dtype=flat), mix


def epoch_order(refs: list[ShardRef], seed: int, epoch: int, weights=None) -> tuple[list[Position], list[dict]]:
    """The epoch's global sample order (with each set's weight applied) and the per-set mixing counts."""
    samples = _Samples(refs)
    order, mix = _order(samples, seed, epoch, weights)
    return [(int(s), int(i)) for s, i in samples.positions(order).tolist()], mix


def global_order(refs: list[ShardRef], seed: int, epoch: int) -> list[Position]:
    return epoch_order(refs, seed, epoch)[0]


def _ceil8(n):
    return -(-n // 8) * 8


def clone_length(refs: list[ShardRef], pos: Position, ref: Position) -> int:
    """Expanded length of sample `pos` with `ref` as its reference: its system turn, the reference's user
    and assistant turns, its own user and assistant turns, rounded up to 8 like expanded_length."""
    head, pair = _part_row(_parts_of(refs[pos[0]], pos[1]))
    return int(_ceil8(head + pair + _part_row(_parts_of(refs[ref[0]], ref[1]))[1]))


def _parts_of(ref: ShardRef, i: int):
    cp = ref.clone_parts
    if isinstance(cp, np.ndarray):
        head, pair = (int(x) for x in cp[i])
        return None if head == -1 else (None, None) if head == -2 else (head, pair)
    return cp[i]


@dataclass
class _Cloning:
    keys: np.ndarray  # sorted flat numbers of the samples that get a reference
    values: np.ndarray  # their references' flat numbers
    lengths: np.ndarray | None  # expanded lengths with the references
    counts: dict


def _choose_references(samples: _Samples, order: np.ndarray, fraction: float, seed: int, epoch: int,
                       limit: int) -> _Cloning:  # fmt: skip
    """Each eligible sample of the epoch draws (from (seed, epoch) and its place in its set's index) whether
    it gets a reference and which other sample of its speaker it is; a pair longer than `limit` stays
    plain. Every member of a set draws twice from the set's stream, groups (speakers) in the order of their
    first sample and members in index order, present this epoch or not: a draw never depends on others."""
    counts = {"eligible": 0, "drawn": 0, "cloned": 0, "lonely": 0, "too_long": 0}
    none = np.zeros(0, dtype=np.int64)
    if not fraction:
        return _Cloning(none, none, samples.lengths, counts)
    refs = samples.refs
    missing = next((r.path for r in refs if r.speakers is None or r.clone_parts is None), None)
    if missing:
        raise PlanError(
            f"data.clone_references needs each sample's speaker in the index, which {missing}'s index "
            "lacks (built by an older higgs-ds): rebuild the shards with this version of `higgs-ds shards build`"
        )
    parts = samples.clone_parts()
    plain_unsized = np.flatnonzero(parts[:, 0] == -2)
    shard = np.searchsorted(samples.starts, plain_unsized, side="right") - 1
    bad = shard[np.array([r.lengths is not None for r in refs], dtype=bool)[shard]]
    if bad.size:
        raise PlanError(
            f"{refs[bad[0]].path}'s index has expanded lengths but not those of its turns (clone_parts), "
            "which planning with references needs: rebuild the shards with `higgs-ds shards build --tokenizer MODEL`"
        )
    groups = _speaker_groups(samples, np.flatnonzero(parts[:, 0] != -1))
    member, group = groups.member, groups.group
    size_of = groups.size[group]
    drawn, j = _clone_draws(samples.dataset_of_samples()[member], size_of, fraction, seed, epoch)
    present = np.zeros(len(parts), dtype=bool)
    present[order] = True
    here = present[member]
    del present
    drawn &= here
    lonely = drawn & (size_of < 2)
    # the candidates' references: the j-th other member of the group (skipping the sample itself)
    at = np.flatnonzero(drawn & ~lonely)
    own = at - groups.start[group[at]]
    keys = member[at]
    values = member[groups.start[group[at]] + np.where(j[at] < own, j[at], j[at] + 1)]
    length = samples.lengths
    too_long = 0
    with_ref = None
    if length is not None:
        head, pair = parts[:, 0].astype(np.int64), parts[:, 1]
        with_ref = _ceil8(head[keys] + pair[keys] + pair[values])
        fits = with_ref <= limit
        too_long = len(fits) - int(fits.sum())
        keys, values, with_ref = keys[fits], values[fits], with_ref[fits]
    counts = {"eligible": int(here.sum()), "drawn": int(drawn.sum()), "cloned": len(keys),
              "lonely": int(lonely.sum()), "too_long": too_long}  # fmt: skip
    sort = np.argsort(keys)
    lengths = None
    if length is not None:
        wide = with_ref.size and with_ref.max() > np.iinfo(length.dtype).max
        lengths = length.astype(np.int64) if wide else length.copy()
        lengths[keys] = with_ref
    return _Cloning(keys[sort], values[sort], lengths, counts)


@dataclass
class _Groups:
    """Eligible samples by speaker: groups in the order of their first sample, members in index order."""

    member: np.ndarray  # flat sample numbers, group after group
    group: np.ndarray  # per member, its group's number
    start: np.ndarray  # per group, where its members start in `member`
    size: np.ndarray  # per group, how many members


def _speaker_groups(samples: _Samples, eligible: np.ndarray) -> _Groups:
    """One stable sort of the speaker keys (two 16-bit radix passes) gives each speaker's members as one run
    in index order, its first sample at the run's start; the runs are then put in the order of those."""
    if len(eligible) == 0:  # no sample can be a cloning target (e.g. a set of dialogues): no groups
        none = np.zeros(0, np.int64)
        return _Groups(eligible[:0], np.zeros(0, np.int32), none, none)
    keys = samples.speaker_keys(eligible)
    by_key = _stable_argsort(keys)
    sorted_keys = keys[by_key]
    del keys
    run_start = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    del sorted_keys
    run_size = np.diff(np.append(run_start, len(by_key)))
    rank = np.argsort(by_key[run_start])  # groups by their first sample (all distinct)
    size = run_size[rank]
    start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    # member t of group g is member t - start[g] of run rank[g]
    at = np.repeat(run_start[rank] - start, size)
    at += np.arange(len(at))
    member = eligible[by_key[at]]
    return _Groups(member, np.repeat(np.arange(len(size), dtype=np.int32), size), start, size)


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, axis=-1, kind="stable") for keys >= 0, by numpy's radix sort of 16-bit keys (a pass
    per 16 bits in use, least significant first) where they fit in 32 bits: 0.16 s a pass for 5M against
    0.55 s for int64."""
    top = int(keys.max(initial=0))
    if top >= 1 << 32:
        return np.argsort(keys, axis=-1, kind="stable")
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), axis=-1, kind="stable")
    if top >= 1 << 16:
        high = (np.take_along_axis(keys, order, axis=-1) >> 16).astype(np.uint16)
        order = np.take_along_axis(order, np.argsort(high, axis=-1, kind="stable"), axis=-1)
    return order


def _clone_draws(dataset_of_member: np.ndarray, group_size: np.ndarray, fraction: float, seed: int,
                 epoch: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each member's two random() values from its set's stream, in member order within the set: whether it
    draws a reference (the first < fraction) and which (int(second x (group size - 1)), the j-th other)."""
    drawn = np.empty(len(dataset_of_member), dtype=bool)
    j = np.empty(len(dataset_of_member), dtype=np.int32)
    for d in np.unique(dataset_of_member).tolist():
        at = np.flatnonzero(dataset_of_member == d)
        done = 0
        for values in float_chunks(f"{seed}/{epoch}/clone/{d}", 2 * len(at)):
            mine = at[done : done + len(values) // 2]
            drawn[mine] = values[0::2] < fraction
            j[mine] = (values[1::2] * (group_size[mine] - 1)).astype(np.int64)
            done += len(mine)
    return drawn, j


class EpochLayout:
    """The all-ranks part of an epoch's plan, computed once: the kept global order, every rank's number of
    micro-batches (the target all ranks are brought to), what was dropped, cloned and mixed. `rank_plan`
    gives one rank's plan from it; `plan_epoch` = both."""

    def __init__(self, refs: list[ShardRef], cfg: BatchingConfig, *, seed: int, epoch: int, world_size: int):
        if (cfg.max_tokens or cfg.max_length) and any(r.lengths is None for r in refs):
            missing = next(r.path for r in refs if r.lengths is None)
            raise PlanError(
                f"budget batching (max_tokens) and max_length need per-sample expanded lengths, which "
                f"{missing}'s index lacks: rebuild the shards with `higgs-ds shards build --tokenizer MODEL`"
            )
        # data.shards may end in directories without shards; DataConfig checks the weights' count exactly
        check_weights(cfg.weights, max(max((r.dataset for r in refs), default=-1) + 1, len(cfg.weights or ())))
        check_clone_fraction(cfg.clone_references)
        self.cfg, self.seed, self.epoch, self.world = cfg, seed, epoch, world_size
        self.samples = samples = _Samples(refs)
        order, self.mix = _order(samples, seed, epoch, cfg.weights)
        self.limit = limit = min(x for x in (cfg.max_tokens, cfg.max_length, NO_LIMIT) if x)
        cloning = _choose_references(samples, order, cfg.clone_references, seed, epoch, limit)
        self.references = References(samples, cloning.keys, cloning.values)
        self.clone = cloning.counts if cfg.clone_references else {}
        self.lengths = cloning.lengths
        self.num_global = len(order)
        if self.lengths is not None and limit < NO_LIMIT:
            keep = self.lengths[order] <= limit
            self.kept, self.dropped = order[keep], order[~keep]
        else:
            self.kept, self.dropped = order, order[:0]
        if len(self.kept) < world_size:
            raise PlanError(f"the shards hold {len(self.kept)} usable samples, fewer than the {world_size} ranks")
        self.per_rank = -(-len(self.kept) // world_size)
        self._rank_counts()

    def padding(self, rank: int) -> int:
        return max(0, (rank + 1) * self.per_rank - max(len(self.kept), rank * self.per_rank))

    def _rank_counts(self) -> None:
        """Micro-batches each rank forms before equalising; with budget batching, packed for all ranks."""
        cfg = self.cfg
        if not cfg.max_tokens:
            self.counts = np.full(self.world, -(-self.per_rank // cfg.batch_size), dtype=np.int64)
            self._packed = None
        else:
            padded = self._block_all()
            self._packed = _pack_windows(self.lengths[padded], self.world, self.per_rank, cfg.window, cfg.max_tokens)
            self.counts = self._packed.batches_per_rank
        self.target = int(self.counts.max())

    def _block_all(self) -> np.ndarray:
        """Every rank's block, back to back: the kept order and its padding (fewer than `world` samples)."""
        return np.concatenate([self.kept, self.kept[: self.world * self.per_rank - len(self.kept)]])

    def num_repeated(self, rank: int) -> int:
        return self.padding(rank) + max(0, self.target - self.per_rank)

    def total_repeated(self) -> int:
        """Samples repeated this epoch over all ranks (padding and equalising), O(ranks)."""
        padding = self.world * self.per_rank - len(self.kept)
        return padding + self.world * max(0, self.target - self.per_rank)

    def rank_spans(self, ranks) -> "_Spans":
        """These ranks' micro-batches, brought to the target count, as spans [a, b) of each rank's rows in
        its batch order, rank after rank (a rank's rows: its block, length-sorted within windows when
        packing by budget)."""
        ranks = np.asarray(ranks, dtype=np.int64)
        if self._packed is None:
            a = np.arange(0, self.per_rank, self.cfg.batch_size)
            group = np.repeat(np.arange(len(ranks)), len(a))
            a = np.tile(a, len(ranks))
            b = np.minimum(a + self.cfg.batch_size, self.per_rank)
        else:
            group, a, b = self._shuffled_batches(ranks)
        return _equalise_spans(group, a, b, len(ranks), self.target)

    def _shuffled_batches(self, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The packed batches of these ranks, each rank's in the order its (seed, epoch, rank) stream shuffles."""
        group, a = np.nonzero(self._packed.starts[ranks])
        last = np.append(group[1:] != group[:-1], True)
        b = np.where(last, self.per_rank, np.append(a[1:], 0))
        count = np.bincount(group, minlength=len(ranks))
        first = np.concatenate([[0], np.cumsum(count)[:-1]])
        keys = [f"{self.seed}/{self.epoch}/batches/{r}" for r in ranks.tolist()]
        order = np.concatenate([shuffled(key, range(n)) + f for key, n, f in zip(keys, count.tolist(), first.tolist())])
        return group[order], a[order], b[order]

    def span_rows(self, rank: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Flat sample numbers of the rows of spans [a, b) of these ranks' rows, span after span."""
        sizes = b - a
        total = int(sizes.sum())
        if not total:
            return self.kept[:0]
        pos = np.repeat(a - (np.cumsum(sizes) - sizes), sizes) + np.arange(total)
        rank = np.repeat(rank, sizes)
        if self._packed is not None:  # sorted position -> position in the rank's block
            pos = self._packed.order[rank, pos]
        q = rank * self.per_rank + pos  # in every rank's blocks back to back; past the kept order: padding
        return self.kept[np.where(q < len(self.kept), q, (q - len(self.kept)) % len(self.kept))]

    def rank_rows(self, rank: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Rank's micro-batches as flat sample numbers (batch k is rows[starts[k]:starts[k + 1]]), with the
        number of batches split and of samples repeated to reach the target count."""
        spans = self.rank_spans([rank])
        rows = self.span_rows(np.full(len(spans.a), rank), spans.a, spans.b)
        starts = np.concatenate([[0], np.cumsum(spans.b - spans.a)]).astype(np.int64)
        return rows, starts, int(spans.splits[0]), int(spans.repeats[0])

    def rank_plan(self, rank: int) -> EpochPlan:
        if not 0 <= rank < self.world:
            raise PlanError(f"rank {rank} is outside world size {self.world}")
        rows, starts, splits, extra = self.rank_rows(rank)
        return self.plan_of(rows, starts, repeated=self.padding(rank) + extra, split=splits)

    def plan_of(self, rows: np.ndarray, starts: np.ndarray, *, repeated: int, split: int) -> EpochPlan:
        """An EpochPlan of these micro-batches (flat sample numbers) with this epoch's counts."""
        dropped = [(int(s), int(i)) for s, i in self.samples.positions(self.dropped).tolist()]
        return EpochPlan(
            batches=Batches(self.samples.positions(rows), starts),
            num_global=self.num_global,
            num_repeated=repeated,
            num_dropped=len(self.dropped),
            num_split=split,
            dropped=dropped,
            references=self.references,
            mix=self.mix,
            clone=self.clone,
            lengths=None if self.lengths is None else self.lengths[rows],
        )


@dataclass
class _Packed:
    """Budget batches of all ranks: the within-window length order and where batches start in it."""

    order: np.ndarray  # per rank block position -> sorted position, for all ranks (world x per_rank)
    starts: np.ndarray  # bool, same shape: a batch starts at this sorted position
    batches_per_rank: np.ndarray


def _pack_windows(lengths: np.ndarray, world: int, per_rank: int, window: int, max_tokens: int) -> _Packed:
    """Every rank's block cut in windows of `window` samples, each sorted by length (stable) and packed
    greedily: a sample starts a new batch when the batch with it would exceed max_tokens (padded
    rectangle: samples x the longest, which in sorted order is the newest)."""
    lengths = lengths.reshape(world, per_rank)
    width = min(window, per_rank)
    per_window = -(-per_rank // width)
    win = np.arange(per_rank) // width
    # one stable sort per rank by (window, length): ties keep the block order, as Python's sorted does
    key = win * (int(lengths.max(initial=0)) + 1) + lengths
    sort = _stable_argsort(key)  # radix passes, then int32: the layout keeps it
    if per_rank < 1 << 31:
        sort = sort.astype(np.int32)
    ordered = np.take_along_axis(lengths, sort, axis=1)
    if world * per_window >= _VECTOR_WINDOWS:
        starts = _greedy_vector(ordered, per_window, width, max_tokens)
    else:
        starts = _greedy_python(ordered, width, max_tokens)
    return _Packed(sort, starts, starts.sum(axis=1))


def _greedy_vector(ordered: np.ndarray, per_window: int, width: int, max_tokens: int) -> np.ndarray:
    """All windows at once, one step per position in a window."""
    world, per_rank = ordered.shape
    grid = np.full((world, per_window * width), -1, dtype=ordered.dtype)
    grid[:, :per_rank] = ordered
    grid = grid.reshape(world * per_window, width)
    starts = np.zeros_like(grid, dtype=bool)
    count = np.zeros(len(grid), dtype=np.int64)
    for t in range(width):
        length = grid[:, t]
        valid = length >= 0
        new = valid & ((count == 0) | ((count + 1) * length > max_tokens))
        starts[:, t] = new
        count = np.where(new, 1, np.where(valid, count + 1, count))
    return starts.reshape(world, per_window * width)[:, :per_rank]


def _greedy_python(ordered: np.ndarray, width: int, max_tokens: int) -> np.ndarray:
    """Few windows: walk the samples."""
    starts = np.zeros(ordered.shape, dtype=bool)
    for r, row in enumerate(ordered.tolist()):
        count = 0
        for t, length in enumerate(row):
            if t % width == 0 or (count + 1) * length > max_tokens:
                starts[r, t], count = True, 0
            count += 1
    return starts


@dataclass
class _Spans:
    """Micro-batches of some ranks as spans [a, b) of each rank's rows, rank after rank (`group`: which of
    the ranks asked for, 0, 1, ...), with each rank's number of batches split and samples repeated."""

    group: np.ndarray
    a: np.ndarray
    b: np.ndarray
    splits: np.ndarray
    repeats: np.ndarray


def _equalise_spans(group: np.ndarray, a: np.ndarray, b: np.ndarray, groups: int, target: int) -> _Spans:
    """Each rank's batches brought to `target` as a Python loop would: split the largest batch (the first
    of the largest; halves in place, the smaller first) until there are `target`, and when every batch has
    one sample, add batches of the rank's first sample at the end. Splitting the largest first means: every
    piece larger than a threshold size is split, then the first few pieces of exactly the threshold, so the
    result comes from the threshold (`_split_threshold`) and a few vector passes, for all ranks at once."""
    size = b - a
    need = target - np.bincount(group, minlength=groups)
    splittable = np.bincount(group, weights=size - 1, minlength=groups).astype(np.int64)
    splits = np.minimum(need, splittable)
    threshold, extra = _split_threshold(size, group, groups, splits)
    while True:
        cut = size > threshold[group]
        if not cut.any():
            break
        group, a, size = _halve(group, a, size, cut)
    at = size == threshold[group]
    before = np.cumsum(at) - at
    before -= before[np.searchsorted(group, np.arange(groups))][group]  # counted within each rank
    group, a, size = _halve(group, a, size, at & (before < extra[group]))
    repeats = need - splits
    if repeats.any():  # batches of the rank's first sample, after its others
        first_a = a[np.searchsorted(group, np.arange(groups))]
        extra_group = np.repeat(np.arange(groups), repeats)
        group = np.concatenate([group, extra_group])
        a = np.concatenate([a, first_a[extra_group]])
        size = np.concatenate([size, np.ones(len(extra_group), dtype=size.dtype)])
        order = np.argsort(group, kind="stable")
        group, a, size = group[order], a[order], size[order]
    return _Spans(group, a, a + size, splits, repeats)


def _split_threshold(size, group, groups: int, splits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, the threshold T and how many pieces of size T are split too: the smallest T such that
    splitting every piece larger than T takes at most `splits` splits, and the rest. Splitting a batch of
    s until no piece exceeds T takes one split per node larger than T of its halving tree, whose depth-d
    nodes are r of size q + 1 and 2^d - r of size q (q = s >> d, r = s mod 2^d): a table over the sizes
    present and the node sizes that can be T."""
    sizes, index = np.unique(size, return_inverse=True)
    candidates = {1}
    for d in range(int(sizes.max(initial=1)).bit_length() + 1):
        q = sizes >> d
        candidates.update(q[q > 0].tolist(), (q[q > 0] + 1).tolist())
    t = np.array(sorted(candidates), dtype=np.int64)
    nodes_over = np.zeros((len(sizes), len(t)))  # [size, T]: splits to bring a batch of that size to <= T
    for d in range(int(sizes.max(initial=1)).bit_length() + 1):
        q, r = sizes >> d, sizes & ((1 << d) - 1)
        nodes_over += r[:, None] * (q[:, None] + 1 > t) + ((1 << d) - r)[:, None] * (q[:, None] > t)
    histogram = np.bincount(group * len(sizes) + index.ravel(), minlength=groups * len(sizes))
    needed = np.rint(histogram.reshape(groups, len(sizes)) @ nodes_over).astype(np.int64)  # [rank, T]
    pick = np.argmax(needed <= splits[:, None], axis=1)  # needed falls with T; at the largest T it is 0
    threshold = t[pick]
    extra = splits - needed[np.arange(groups), pick]
    return threshold, np.where(threshold > 1, extra, 0)


def _halve(group, a, size, cut):
    """Split the pieces where `cut` in two in place, the first half size // 2."""
    copies = 1 + cut
    first = (np.cumsum(copies) - copies)[cut]
    group, a, size, half = np.repeat(group, copies), np.repeat(a, copies), np.repeat(size, copies), size[cut] // 2
    size[first], size[first + 1] = half, size[first + 1] - half
    a[first + 1] += half
    return group, a, size


def plan_epoch(
    refs: list[ShardRef], cfg: BatchingConfig, *, seed: int, epoch: int, rank: int, world_size: int
) -> EpochPlan:
    if not 0 <= rank < world_size:
        raise PlanError(f"rank {rank} is outside world size {world_size}")
    return EpochLayout(refs, cfg, seed=seed, epoch=epoch, world_size=world_size).rank_plan(rank)


def batches_for_worker(batches, worker: int, num_workers: int):
    """Worker `worker`'s share, in the round-robin order a DataLoader merges worker outputs in."""
    return batches[worker::num_workers]
