"""Stages 5-7 composed: the per-rank, multi-worker training stream with exact resume.

    loader = build_dataloader(DataConfig(shards=["shards/mine"]), tokenizer, model_config,
                              rank=rank, world_size=world_size)
    for batch in loader: ...                 # the same number of batches on every rank
    state = loader.state_dict()              # save with the checkpoint
    loader.load_state_dict(state)            # in a new process: continues with the next batch

The epoch plan (higgs_ds.stream.plan) fixes every rank's micro-batches before the epoch starts; each
dataloader worker reads its round-robin share, encodes (boson's prepare_chatml_sample, or the ids stored
at build time) and collates (higgs_ds.stream.collate) whole batches. This replaces ms-swift's rank-0 streaming
dispatcher.

Two guards keep a rank from training on something it was not meant to, or from waiting forever:

* the data position saved in a checkpoint carries a fingerprint of everything the epoch plan is computed
  from (each shard directory's index entries, the batching settings, seed); a resume whose plan would
  differ is refused with what changed (`load_state_dict`), since batch k of another plan is other samples.
  The position is global (how many micro-batches each of how many ranks took, higgs_ds.stream.elastic), so
  a resume on another number of ranks continues the same epoch with the batches not yet taken;
* with workers, the rank waits at most `data.loader_timeout` seconds for its next micro-batch, then fails
  naming the shards that batch reads; a UserError raised inside a worker (a bad shard) reaches the rank as
  the same one-line error, not wrapped in the worker's traceback.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass, field

import torch

from higgs_ds.errors import UserError
from higgs_ds.shards import verified
from higgs_ds.stream.checked_read import read_encoded
from higgs_ds.stream.elastic import resumed_plan
from higgs_ds.stream.plan import (
    BatchingConfig,
    EpochLayout,
    PlanError,
    batches_for_worker,
    check_clone_fraction,
    check_weights,
    plan_epoch,
)
from higgs_ds.stream.reader import lengths_tokenizer, load_index, read_positions, shard_refs
from higgs_ds.stream.tokens import SampleEncoder, tokenizer_fingerprint
from higgs_ds.train.checkpoint import check_data_state

log = logging.getLogger(__name__)
V3 = "v3"  # higgs_ds.models.family.V3 (the stream sits below models)
# Workers are forked after the tokenizer ran in the parent; the Rust pool must not be shared.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class DataConfig:
    shards: list[str] = field(default_factory=list)
    """Shard directories (each with an index.json), read as one data set."""
    batch_size: int = 2
    """Samples per micro-batch on each rank (used when max_tokens is not set)."""
    max_tokens: int | None = None
    """Budget of expanded positions per micro-batch (samples x longest sample); needs shards built with
    --tokenizer. Samples longer than the budget are dropped and counted, never truncated."""
    max_length: int | None = None
    """Drop (and count) samples whose expanded length exceeds this, e.g. the model's context."""
    num_workers: int = 1
    """Dataloader worker processes per rank (0 reads in the training process)."""
    seed: int = 0
    """Seed of the sample order; the same seed gives the same order on every rank and for any worker count."""
    collator: str = "fast"
    """"fast" (vectorised, checked against boson's on the first batch of each worker) or "boson"
    (boson's HiggsAudioSampleCollator itself)."""
    weights: list[float] | None = None
    """Mixing weight of each shard directory, in the order of `shards`: how many times its samples are
    seen per epoch (1 = once each; 2 = twice; 0.5 = a half, chosen anew each epoch from seed and epoch;
    0 = left out). None: every directory once. Repeated and left-out samples are counted in the log."""
    clone_references: float = 0.0
    """Fraction (0-1) of plain single-speaker TTS samples trained as voice cloning: another sample of the
    same speaker from the same directory is put before it as reference (user text + assistant audio,
    start_index 3: only the target is trained), chosen from (seed, epoch). Needs shards built by this
    version (speakers in the index); with max_tokens, also --tokenizer."""
    loader_timeout: float = 600.0
    """Seconds a rank waits for its next micro-batch from a dataloader worker before it fails with the
    names of the shards that batch reads (a hung network filesystem, a FIFO or device in place of a shard)
    instead of hanging the job. Covers reading, decoding and collating one batch; 0 waits forever; with
    num_workers = 0 there is no worker to time out."""
    verify_shards: str = "once"
    """When a dataloader worker checks a shard's sha256 against its index.json: "once" per machine and file
    version (a record in $HIGGS_DS_CACHE or ~/.cache/higgs-ds/verified-shards, keyed by the file's path,
    inode, size, mtime and ctime, so any write to the file hashes it again; later opens check only its tar
    headers; the first such process also checks every sample of the shard and records where each one's token
    ids and codes lie, so later opens read a sample without decoding it: higgs_ds.shards.checked) or
    "always" (every worker, every epoch hashes every shard it opens and checks every sample it reads: tens of
    us a sample, and it also catches a file changed in place by something that restores its ctime, i.e. the
    clock or root)."""

    def __post_init__(self):
        if self.weights is not None:
            check_weights(self.weights, len(self.shards))
        check_clone_fraction(self.clone_references)
        if self.verify_shards not in verified.MODES:
            raise PlanError(
                f"data.verify_shards = {self.verify_shards!r}: expected one of {verified.MODES} ('once': hash "
                "each shard once per machine and file version; 'always': at every open)"
            )
        timeout = self.loader_timeout
        number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        if not number or not math.isfinite(timeout) or timeout < 0:
            raise PlanError(
                f"data.loader_timeout = {timeout!r}: it is the seconds a rank waits for a dataloader worker's "
                "next batch, a finite number >= 0 (0 waits forever)"
            )

    def batching(self) -> BatchingConfig:
        return BatchingConfig(
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            max_length=self.max_length,
            weights=tuple(float(w) for w in self.weights) if self.weights is not None else None,
            clone_references=float(self.clone_references),
        )


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of encoded samples for the current epoch, from `start_batch` on."""

    def __init__(self, cfg: DataConfig, tokenizer, *, rank: int, world_size: int, family: str | None = None):
        """`family` "v3" encodes Higgs TTS 3 prompts and plans with the shards' v3 lengths; anything else
        (None, "native", "boson") boson's prepare_chatml_sample tokens and the v2 lengths."""
        if not cfg.shards:
            raise PlanError("no shard directories given (data.shards is empty)")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        verified.set_mode(cfg.verify_shards)  # module-wide: the dataloader workers forked later inherit it
        v3 = family == V3
        self.refs = shard_refs(cfg.shards, lengths_for=V3) if v3 else shard_refs(cfg.shards)
        indexes = [load_index(d) for d in cfg.shards]
        mine = tokenizer_fingerprint(tokenizer)
        if v3:
            check_v3_shards(cfg, indexes, mine)
            from higgs_ds.models.v3.prompt import V3SampleEncoder  # the family's prompts: models sits above stream

            self.encode = V3SampleEncoder(tokenizer)
        else:
            stored = all(index["build"].get("tokenizer_fingerprint") == mine for index in indexes)
            self.encode = SampleEncoder(tokenizer, stored_tokens=stored)
        # stored token ids must be ids of this tokenizer: one outside it would index past the embedding
        self.vocab_size = len(tokenizer)
        self.shard_sets = [shard_set_fingerprint(index) for index in indexes]
        self.epoch, self.start_batch = 0, 0
        # Segments of this epoch run before this one at other world sizes, [(world, batches each), ...]:
        # empty for an epoch that started at this world size (see higgs_ds.stream.elastic).
        self.segments: list[tuple[int, int]] = []
        self._plan = None  # (key, plan): the plan is asked for by num_batches, state_dict and every worker

    def plan_fingerprint(self) -> dict:
        """Everything plan_epoch computes this rank's batches from, as JSON values: saved with the data
        position, compared on resume (a position only means something in the plan it was taken from)."""
        batching = dataclasses.asdict(self.cfg.batching())
        return json.loads(
            json.dumps(
                {"seed": self.cfg.seed, "world_size": self.world_size, "batching": batching, "shards": self.shard_sets}
            )
        )

    def batch_shards(self, k: int) -> list[str]:
        """The shard files micro-batch k of this epoch reads (its samples and their cloning references)."""
        plan = self.plan()
        batch = plan.batches[k] if 0 <= k < len(plan.batches) else []
        positions = list(batch) + [plan.references[p] for p in batch if p in plan.references]
        return list(dict.fromkeys(self.refs[s].path for s, _ in positions))

    def plan(self):
        key = (self.epoch, tuple(self.segments))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, self._make_plan())
        return self._plan[1]

    def _make_plan(self):
        batching, seed = self.cfg.batching(), self.cfg.seed
        if not self.segments:
            return plan_epoch(
                self.refs, batching, seed=seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size
            )
        # the epoch began at another world size: its plan there, minus what the segments consumed
        layout = EpochLayout(self.refs, batching, seed=seed, epoch=self.epoch, world_size=self.segments[0][0])
        return resumed_plan(layout, self.segments, self.rank, self.world_size)

    def num_batches(self) -> int:
        """Micro-batches this rank (and every rank) yields per epoch."""
        return len(self.plan().batches)

    def check_workers(self, num_workers: int) -> None:
        batches = self.num_batches()
        if num_workers > batches:
            raise PlanError(
                f"{num_workers} dataloader workers but only {batches} micro-batches per rank per epoch; "
                f"use at most {batches} workers (data.num_workers) or more data"
            )

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        verified.set_mode(self.cfg.verify_shards)  # a worker started by spawn, not fork, has the default
        try:
            yield from self._batches(info)
        except UserError as err:
            if info is None:
                raise
            yield WorkerFailure.of(err)  # the rank raises it (see WorkerFailure); this worker is done

    def _batches(self, info):
        plan = self.plan()
        remaining = plan.batches[self.start_batch :]
        mine = batches_for_worker(remaining, info.id, info.num_workers) if info else remaining
        if (info is None or info.id == 0) and self.rank == 0 and self.start_batch == 0 and self.segments:
            log.info(
                "epoch %d continues on %d ranks after %s: %d batches per rank left, %d batches split and %d "
                "samples repeated to equalise ranks",
                self.epoch,
                self.world_size,
                ", then ".join(f"{done} batches on {world} ranks" for world, done in self.segments),
                len(plan.batches),
                plan.num_split,
                plan.num_repeated,
            )
        elif (info is None or info.id == 0) and self.rank == 0 and self.start_batch == 0:
            log.info(
                "epoch %d: %d batches per rank; %d samples repeated, %d dropped over the length limits, "
                "%d batches split to equalise ranks",
                self.epoch,
                len(plan.batches),
                plan.num_repeated,
                plan.num_dropped,
                plan.num_split,
            )
            for m in plan.mix:
                log.info(
                    "epoch %d: %s (weight %g): %d samples, %d drawn, %d repeated, %d left out",
                    self.epoch,
                    self.cfg.shards[m["set"]],
                    m["weight"],
                    m["samples"],
                    m["drawn"],
                    m["repeated"],
                    m["left_out"],
                )
            if plan.clone:
                c = plan.clone
                log.info(
                    "epoch %d: cloning references: %d of %d plain TTS samples drawn, %d cloned, %d stay plain "
                    "(their speaker has no other sample), %d stay plain (too long with a reference)",
                    self.epoch,
                    c["drawn"],
                    c["eligible"],
                    c["cloned"],
                    c["lonely"],
                    c["too_long"],
                )
        for batch in mine:
            yield self._with_references(batch, plan.references) if plan.references else self.read_batch(batch)

    def read_batch(self, batch) -> list:
        """The EncodedSamples at `batch`'s positions: without decoding from shards this machine has checked
        whole (higgs_ds.stream.checked_read, plain SampleEncoder with stored ids), else read strictly."""
        if type(self.encode) is SampleEncoder and self.encode.stored_tokens:
            samples = read_encoded(self.refs, batch, self.vocab_size)
            if samples is not None:
                return samples
        return [self.encode(r) for r in read_positions(self.refs, batch, vocab_size=self.vocab_size)]

    def _with_references(self, batch, references: dict) -> list:
        """The batch's samples, those with a reference (decided by the plan) assembled for cloning."""
        extra = [references[p] for p in batch if p in references]
        records = list(read_positions(self.refs, list(batch) + extra, vocab_size=self.vocab_size))
        ref_records = iter(records[len(batch) :])
        return [
            self.encode.with_reference(record, next(ref_records)) if pos in references else self.encode(record)
            for pos, record in zip(batch, records)
        ]


def check_v3_shards(cfg: DataConfig, indexes: list[dict], mine: str) -> None:
    """What a v3 run refuses before its first batch: a set whose index counts samples v3 does not train (the
    builder's v3 encoder found them: named now, never skipped), and, for budget batching, max_length and
    cloning references, lengths computed by another tokenizer than this one (other positions than the
    batches have). A set built without a v3 tokenizer names such a sample when a worker reaches it."""
    for shard_dir, index in zip(cfg.shards, indexes):
        refused = (index.get("build") or {}).get("v3_unsupported")
        if refused:  # found by the shard builder's v3 encoder: said now, not when a worker reaches them
            ids = ", ".join(map(str, (index["build"].get("v3_unsupported_ids") or [])))
            raise PlanError(
                f"{shard_dir}: {refused} samples that Higgs TTS 3 does not train (dialogue or multi-turn; e.g. {ids}): "
                "v3 trains single-speaker TTS and voice-cloning samples; build a shard set without them for v3"
            )
    if not (cfg.max_tokens or cfg.max_length or cfg.clone_references):
        return
    for shard_dir, index in zip(cfg.shards, indexes):
        theirs = lengths_tokenizer(index, V3)
        if theirs != mine:
            what = "no Higgs TTS 3 lengths" if theirs is None else "Higgs TTS 3 lengths of another tokenizer"
            raise PlanError(
                f"{shard_dir}: its index has {what}, which data.max_tokens, data.max_length and "
                "data.clone_references plan with: build the shards with `--tokenizer` naming this Higgs TTS 3 "
                "model directory too (a v2 tokenizer may be given beside it), or use data.batch_size alone"
            )


def shard_set_fingerprint(index: dict) -> dict:
    """One shard directory as the plan sees it: the sha256 of its index's per-shard entries (file names,
    counts, sizes, sha256; lengths, speakers, clone_parts, or in schema 2 the sidecar's sha256 and the
    speaker table; not the build's timings or paths), and its shard
    and sample counts, kept readable for the message when they differ. A moved directory keeps it."""
    shards = index["shards"]
    # schema 2 keeps lengths, speakers and clone parts in the sidecar: its sha256 stands for them
    content = shards
    if "sample_table" in index:
        content = [shards, {"sidecar_sha256": index["sample_table"]["sha256"], "speakers": index["speaker_table"]}]
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return {
        "shards": len(shards),
        "samples": sum(s["num_samples"] for s in shards),
        "sha256": hashlib.sha256(canonical).hexdigest(),
    }


@dataclass(frozen=True)
class WorkerFailure:
    """A UserError raised in a dataloader worker, sent to the rank as a batch: torch would re-raise it with
    the worker's traceback pasted into its message; the rank raises it as it was, one line."""

    kind: type
    message: str

    @classmethod
    def of(cls, err: UserError) -> "WorkerFailure":
        try:
            pickle.dumps(type(err))  # it crosses a process boundary; a class pickle cannot name becomes UserError
            kind = type(err)
        except Exception:
            kind = UserError
        return cls(kind, str(err))

    def error(self) -> UserError:
        try:
            err = self.kind(self.message)
        except Exception:  # a subclass with another constructor
            err = None
        return err if isinstance(err, UserError) else UserError(self.message)


class _PassFailures:
    """The collate_fn as run in a worker: a WorkerFailure goes through untouched, and a UserError of the
    collator itself (a bad sample found while collating) becomes one."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, item):
        if isinstance(item, WorkerFailure):
            return item
        try:
            return self.collate_fn(item)
        except UserError as err:
            if torch.utils.data.get_worker_info() is None:
                raise
            return WorkerFailure.of(err)


class LoaderTimeout(UserError):
    """A dataloader worker gave no batch within data.loader_timeout."""


_BATCHING_DEFAULTS = json.loads(json.dumps(dataclasses.asdict(BatchingConfig())))
_TORCH_TIMEOUT = "DataLoader timed out"  # how torch's RuntimeError for `timeout` begins


class EpochDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a ShardStream that counts its own epochs and knows its position: state_dict()
    after k batches, then load_state_dict() in a new process, continues with batch k+1 of the same epoch
    (with any number of workers). Each complete pass over it is one epoch; the next pass is the next.

    `endless`: one pass runs on from epoch to epoch. The trainer uses it so that HF never sees an epoch end:
    HF groups micro-batches for gradient accumulation across its epochs, and a data epoch whose micro-batch
    count is not a multiple of the accumulation steps would otherwise end in a short fetch window that HF
    merges with the next epoch's first one (wrong loss normalisation, a checkpoint position mid-window)."""

    def __init__(self, stream: ShardStream, collate_fn, num_workers: int, endless: bool = False):
        stream.check_workers(num_workers)
        self.endless = endless
        super().__init__(
            stream,
            batch_size=None,
            collate_fn=_PassFailures(collate_fn),
            num_workers=num_workers,
            persistent_workers=False,
            multiprocessing_context="fork" if num_workers else None,
            # without a timeout a worker stuck on a shard that never answers hangs the whole job
            timeout=float(stream.cfg.loader_timeout) if num_workers else 0,
            # Starting an epoch's iterator draws worker seeds; from the global torch RNG that would shift
            # the training RNG (LoRA dropout) by one draw per epoch start, and a resume mid-epoch starts one
            # more iterator than an uninterrupted run: different dropout masks after the resume.
            generator=torch.Generator().manual_seed(stream.cfg.seed),
        )
        self._consumed = 0

    def set_epoch(self, epoch: int) -> None:
        """HF Trainer's epoch counter restarts at 0 on resume; the stream keeps its own (see seek)."""

    def seek(self, epoch: int, batches_done: int = 0, segments=()) -> None:
        """Continue at batch `batches_done` of this rank's share of `epoch`, after `segments` (the parts of
        the epoch run at other world sizes, see higgs_ds.stream.elastic)."""
        self.dataset.epoch, self.dataset.start_batch, self._consumed = epoch, batches_done, batches_done
        segments = [tuple(s) for s in segments]
        # nothing taken yet in this epoch: it is planned at this world size from the start; a segment that took
        # nothing after the first changes nothing (the first one stays: it fixes the epoch's batches)
        if all(done == 0 for _, done in segments):
            segments = []
        self.dataset.segments = segments[:1] + [s for s in segments[1:] if s[1] > 0]

    def __iter__(self):
        while True:
            self._consumed = self.dataset.start_batch
            yield from self._epoch()
            self.seek(self.dataset.epoch + 1)  # a completed epoch: the next pass is the next epoch
            if not self.endless:
                return

    def _epoch(self):
        """One pass of torch's iterator; a stuck worker or a worker's UserError fails the rank, by name."""
        if self.num_workers:
            # Forked workers share the rank's memory until they write to it; a garbage collection in a
            # worker writes to every object it visits (its GC header), copying the rank's whole Python heap
            # into each worker (140 MB each in a test process). Frozen objects are never visited.
            gc.collect()  # what is garbage now is not frozen with the rest
            gc.freeze()
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                if not str(err).startswith(_TORCH_TIMEOUT):
                    raise
                batch = self._timed_out()
            if isinstance(batch, (WorkerFailure, LoaderTimeout)):
                del batches  # torch's iterator shuts its workers down now (a stuck one is terminated)
                raise batch.error() if isinstance(batch, WorkerFailure) else batch
            self._consumed += 1
            yield batch

    def _timed_out(self) -> LoaderTimeout:
        stream, k = self.dataset, self._consumed  # batches arrive in plan order: the pending one is batch k
        worker = (k - stream.start_batch) % self.num_workers
        paths = stream.batch_shards(k)
        named = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
        return LoaderTimeout(
            f"rank {stream.rank}: dataloader worker {worker} gave no micro-batch in {self.timeout:g} s "
            f"(data.loader_timeout); micro-batch {k} of epoch {stream.epoch} reads {named or 'no shard'}: "
            "a worker stalls on a shard file that does not answer (a hung network filesystem, a FIFO or device "
            "in place of a shard); check that these are readable regular files (`higgs-ds shards verify DIR` "
            "reads every shard), or raise data.loader_timeout if the filesystem is only slow"
        )

    def state_dict(self) -> dict:
        epoch, done = self.dataset.epoch, self._consumed
        segments = [list(s) for s in self.dataset.segments] + [[self.dataset.world_size, done]]
        if done >= self.dataset.num_batches():  # the epoch's last batch was taken: resume at the next epoch
            epoch, done, segments = epoch + 1, 0, [[self.dataset.world_size, 0]]
        return {
            "epoch": epoch,
            "batches_done": done,
            # the global position: W ranks took b batches each, in order (higgs_ds.stream.elastic)
            "segments": segments,
            "seed": self.dataset.cfg.seed,
            "world_size": self.dataset.world_size,
            "rank": self.dataset.rank,
            "weights": None if self.dataset.cfg.weights is None else list(self.dataset.cfg.weights),
            "clone_references": self.dataset.cfg.clone_references,
            "plan": self.dataset.plan_fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position, once it is known to belong to this run's plan. `state["file"]`
        (set by checkpoint.read_data_state) names the file in messages."""
        source = state.get("file") or "the saved data position"
        check_data_state(state, source)
        changes = self._changes(state)
        if changes:
            raise PlanError(
                f"{source}: the saved data position was taken in another epoch plan than this run's: "
                f"{'; '.join(changes)}. Batch k of another plan is other samples (some would be skipped, some "
                "repeated): resume with the saved settings and shards, or train into a new output_dir"
            )
        if state["rank"] != self.dataset.rank and state["world_size"] == self.dataset.world_size:
            raise PlanError(f"{source} is rank {state['rank']}'s data position, not rank {self.dataset.rank}'s")
        segments = [tuple(s) for s in state.get("segments") or [[state["world_size"], state["batches_done"]]]]
        if state["world_size"] == self.dataset.world_size:
            self.seek(state["epoch"], state["batches_done"], segments[:-1])
        else:  # the rest of the epoch, dealt to this run's ranks
            self.seek(state["epoch"], 0, segments)
        try:
            batches = self.dataset.num_batches()
        except PlanError as err:
            raise PlanError(f"{source}: {err}") from None
        if self.dataset.start_batch > batches:
            raise PlanError(
                f"{source}: {state['batches_done']} batches done in epoch {state['epoch']}, but the epoch has "
                f"{batches}: resume with the settings and shards it was saved with"
            )

    def _changes(self, state: dict) -> list[str]:
        """What differs between the saved plan and this run's, each as 'setting: saved X, now Y'."""
        if "plan" not in state:
            return self._legacy_changes(state)
        saved, now = state["plan"], self.dataset.plan_fingerprint()
        changes = []  # the world size may differ: the position is global (higgs_ds.stream.elastic)
        if saved.get("seed") != now["seed"]:
            changes.append(f"data.seed: saved {saved.get('seed')}, now {now['seed']}")
        saved_batching = saved.get("batching") if isinstance(saved.get("batching"), dict) else {}
        for key, value in now["batching"].items():
            # a setting added after the position was saved had its default value then
            before = saved_batching.get(key, _BATCHING_DEFAULTS[key])
            if before != value:
                name = "the batching window" if key == "window" else f"data.{key}"  # window: not a setting
                changes.append(f"{name}: saved {before}, now {value}")
        changes += _shard_set_changes(saved.get("shards"), now["shards"], self.dataset.cfg.shards)
        return changes

    def _legacy_changes(self, state: dict) -> list[str]:
        """A position saved before plans were fingerprinted: only what it recorded can be compared; the
        rest (shards, batch settings) is assumed unchanged, with a warning."""
        cfg, changes = self.dataset.cfg, []
        if state["world_size"] != self.dataset.world_size:
            changes.append(
                f"world size: saved {state['world_size']} ranks, now {self.dataset.world_size} (a resume needs "
                "the same number of ranks)"
            )
        if state["seed"] != cfg.seed:
            changes.append(f"data.seed: saved {state['seed']}, now {cfg.seed}")
        weights = None if cfg.weights is None else list(cfg.weights)
        if state.get("weights") != weights:
            changes.append(f"data.weights: saved {state.get('weights')}, now {weights}")
        saved_fraction = state.get("clone_references", 0.0)
        if saved_fraction != cfg.clone_references:
            changes.append(f"data.clone_references: saved {saved_fraction}, now {cfg.clone_references}")
        if not changes:
            log.warning(
                "%s was saved by an older higgs-ds without a fingerprint of its epoch plan: its shards and "
                "batch settings cannot be checked and are assumed unchanged (data.shards, data.batch_size, "
                "data.max_tokens, data.max_length must be those of the run that saved it)",
                state.get("file") or "the saved data position",
            )
        return changes


def _shard_set_changes(saved, now: list[dict], dirs: list[str]) -> list[str]:
    if not isinstance(saved, list) or len(saved) != len(now):
        count = len(saved) if isinstance(saved, list) else saved
        return [f"data.shards: saved {count} directories, now {len(now)}"]
    changes = []
    for j, (old, new) in enumerate(zip(saved, now)):
        if old != new:
            described = old if not isinstance(old, dict) else _describe_set(old)
            changes.append(
                f"data.shards[{j}] ({dirs[j]}): saved {described}, now {_describe_set(new)} (its index.json "
                "changed: other shards, counts or lengths)"
            )
    return changes


def _describe_set(fp: dict) -> str:
    return f"{fp.get('shards')} shards / {fp.get('samples')} samples, index sha256 {str(fp.get('sha256'))[:12]}"


def build_dataloader(cfg: DataConfig, tokenizer, model_config, *, rank: int, world_size: int) -> EpochDataLoader:
    """This rank's loader with the batch layout of `model_config`'s family (tests, benchmarks, tools; the
    trainer makes its own from the same parts)."""
    # the family's layout and prompts: models sits above stream
    from higgs_ds.models.interface import config_family, make_collator

    stream = ShardStream(cfg, tokenizer, rank=rank, world_size=world_size, family=config_family(model_config))
    return EpochDataLoader(stream, make_collator(model_config, tokenizer, cfg.collator), cfg.num_workers)
