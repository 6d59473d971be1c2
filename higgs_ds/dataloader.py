"""Stages 5-7 composed: the per-rank, multi-worker training stream.

    loader = build_dataloader(DataConfig(shards=["shards/demo_out"]), tokenizer, model_config,
                              rank=rank, world_size=world_size)

Every rank gets the same number of samples per epoch (see shard_reader.plan_epoch), split between its
dataloader workers, so every rank yields the same number of batches and no rank waits for another in
a collective at the end of an epoch. This replaces ms-swift's rank-0 streaming dispatcher.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from higgs_ds.collate import BatchCollator
from higgs_ds.encoding import SampleEncoder
from higgs_ds.shard_reader import plan_epoch, read_positions, shard_refs, split_for_worker

log = logging.getLogger(__name__)
# Workers are forked after the tokenizer ran in the parent; the Rust pool must not be shared.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class DataConfig:
    shards: list[str] = field(default_factory=list)
    """Shard directories (each with an index.json), read as one data set."""
    batch_size: int = 2
    """Samples per micro-batch on each rank."""
    num_workers: int = 1
    """Dataloader worker processes per rank (0 reads in the training process)."""
    seed: int = 0
    """Seed of the shard order; the same seed gives the same order on every rank."""


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's encoded samples for the current epoch (call set_epoch before each pass)."""

    def __init__(self, cfg: DataConfig, tokenizer, *, rank: int, world_size: int):
        if not cfg.shards:
            raise ValueError("no shard directories given (data.shards is empty)")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.refs = shard_refs(cfg.shards)
        self.encode = SampleEncoder(tokenizer)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self):
        return plan_epoch(self.refs, seed=self.cfg.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)

    def num_batches(self) -> int:
        """Micro-batches this rank (and every rank) yields per epoch."""
        n = len(self.plan().positions)
        workers = max(self.cfg.num_workers, 1)
        return sum(-(-len(split_for_worker(range(n), w, workers)) // self.cfg.batch_size) for w in range(workers))

    def __iter__(self):
        plan = self.plan()
        info = torch.utils.data.get_worker_info()
        positions = split_for_worker(plan.positions, info.id, info.num_workers) if info else plan.positions
        if info is None or info.id == 0:
            if plan.num_repeated and self.rank == 0:
                log.info(
                    "epoch %d: %d samples repeated so every one of %d ranks gets %d",
                    self.epoch,
                    plan.num_repeated,
                    self.world_size,
                    len(plan.positions),
                )
        for record in read_positions(self.refs, positions):
            yield self.encode(record)


class EpochDataLoader(torch.utils.data.DataLoader):
    """A DataLoader that forwards set_epoch to its dataset (HF Trainer calls it at every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def build_dataloader(cfg: DataConfig, tokenizer, model_config, *, rank: int, world_size: int) -> EpochDataLoader:
    stream = ShardStream(cfg, tokenizer, rank=rank, world_size=world_size)
    return EpochDataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=BatchCollator(model_config),
        persistent_workers=False,
        multiprocessing_context="fork" if cfg.num_workers else None,
    )
