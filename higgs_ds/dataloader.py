"""Stages 5-7 composed: the per-rank, multi-worker training stream with exact resume.

    loader = build_dataloader(DataConfig(shards=["shards/mine"]), tokenizer, model_config,
                              rank=rank, world_size=world_size)
    for batch in loader: ...                 # the same number of batches on every rank
    state = loader.state_dict()              # save with the checkpoint
    loader.load_state_dict(state)            # in a new process: continues with the next batch

The epoch plan (higgs_ds.epoch_plan) fixes every rank's micro-batches before the epoch starts; each
dataloader worker reads its round-robin share, encodes (boson's prepare_chatml_sample, or the ids stored
at build time) and collates (higgs_ds.collate) whole batches. This replaces ms-swift's rank-0 streaming
dispatcher.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from higgs_ds.collate import BatchCollator
from higgs_ds.encoding import SampleEncoder, tokenizer_fingerprint
from higgs_ds.epoch_plan import (
    BatchingConfig,
    PlanError,
    batches_for_worker,
    check_clone_fraction,
    check_weights,
    plan_epoch,
)
from higgs_ds.shard_reader import load_index, read_positions, shard_refs

log = logging.getLogger(__name__)
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

    def __post_init__(self):
        if self.weights is not None:
            check_weights(self.weights, len(self.shards))
        check_clone_fraction(self.clone_references)

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

    def __init__(self, cfg: DataConfig, tokenizer, *, rank: int, world_size: int):
        if not cfg.shards:
            raise PlanError("no shard directories given (data.shards is empty)")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.refs = shard_refs(cfg.shards)
        mine = tokenizer_fingerprint(tokenizer)
        stored = all(load_index(d)["build"].get("tokenizer_fingerprint") == mine for d in cfg.shards)
        self.encode = SampleEncoder(tokenizer, stored_tokens=stored)
        self.epoch, self.start_batch = 0, 0
        self._plan = None  # (epoch, plan): the plan is asked for by num_batches, state_dict and every worker

    def plan(self):
        if self._plan is None or self._plan[0] != self.epoch:
            plan = plan_epoch(
                self.refs,
                self.cfg.batching(),
                seed=self.cfg.seed,
                epoch=self.epoch,
                rank=self.rank,
                world_size=self.world_size,
            )
            self._plan = (self.epoch, plan)
        return self._plan[1]

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
        plan = self.plan()
        info = torch.utils.data.get_worker_info()
        remaining = plan.batches[self.start_batch :]
        mine = batches_for_worker(remaining, info.id, info.num_workers) if info else remaining
        if (info is None or info.id == 0) and self.rank == 0 and self.start_batch == 0:
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
            if plan.references:
                yield self._with_references(batch, plan.references)
            else:
                yield [self.encode(record) for record in read_positions(self.refs, batch)]

    def _with_references(self, batch, references: dict) -> list:
        """The batch's samples, those with a reference (decided by the plan) assembled for cloning."""
        extra = [references[p] for p in batch if p in references]
        records = list(read_positions(self.refs, list(batch) + extra))
        ref_records = iter(records[len(batch) :])
        return [
            self.encode.with_reference(record, next(ref_records)) if pos in references else self.encode(record)
            for pos, record in zip(batch, records)
        ]


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
            collate_fn=collate_fn,
            num_workers=num_workers,
            persistent_workers=False,
            multiprocessing_context="fork" if num_workers else None,
            # Starting an epoch's iterator draws worker seeds; from the global torch RNG that would shift
            # the training RNG (LoRA dropout) by one draw per epoch start, and a resume mid-epoch starts one
            # more iterator than an uninterrupted run: different dropout masks after the resume.
            generator=torch.Generator().manual_seed(stream.cfg.seed),
        )
        self._consumed = 0

    def set_epoch(self, epoch: int) -> None:
        """HF Trainer's epoch counter restarts at 0 on resume; the stream keeps its own (see seek)."""

    def seek(self, epoch: int, batches_done: int = 0) -> None:
        self.dataset.epoch, self.dataset.start_batch, self._consumed = epoch, batches_done, batches_done

    def __iter__(self):
        while True:
            self._consumed = self.dataset.start_batch
            for batch in super().__iter__():
                self._consumed += 1
                yield batch
            self.seek(self.dataset.epoch + 1)  # a completed epoch: the next pass is the next epoch
            if not self.endless:
                return

    def state_dict(self) -> dict:
        epoch, done = self.dataset.epoch, self._consumed
        if done >= self.dataset.num_batches():  # the epoch's last batch was taken: resume at the next epoch
            epoch, done = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches_done": done,
            "seed": self.dataset.cfg.seed,
            "world_size": self.dataset.world_size,
            "rank": self.dataset.rank,
            "weights": None if self.dataset.cfg.weights is None else list(self.dataset.cfg.weights),
            "clone_references": self.dataset.cfg.clone_references,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.dataset.world_size or state["seed"] != self.dataset.cfg.seed:
            raise PlanError(
                f"the saved data position is for world size {state['world_size']} and seed "
                f"{state['seed']}; this run has {self.dataset.world_size} and {self.dataset.cfg.seed}: "
                "resume with the same number of ranks and data.seed"
            )
        cfg = self.dataset.cfg
        saved = (state.get("weights"), state.get("clone_references", 0.0))  # absent in older states: defaults
        if saved != (None if cfg.weights is None else list(cfg.weights), cfg.clone_references):
            raise PlanError(
                f"the saved data position is for data.weights {saved[0]} and data.clone_references {saved[1]}; "
                f"this run has {cfg.weights} and {cfg.clone_references}: they change the epoch's batches, "
                "resume with the saved values (or start a new output_dir)"
            )
        self.seek(state["epoch"], state["batches_done"])


def build_dataloader(cfg: DataConfig, tokenizer, model_config, *, rank: int, world_size: int) -> EpochDataLoader:
    stream = ShardStream(cfg, tokenizer, rank=rank, world_size=world_size)
    return EpochDataLoader(stream, BatchCollator(model_config, cfg.collator), cfg.num_workers)
