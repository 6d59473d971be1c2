"""`higgs-ds train`'s pipeline: SWIFT's SwiftSft, with the run config (not SWIFT's arguments) choosing the
data (the per-rank shard streams, opened once every index's codec matches the model) and the resume."""

from __future__ import annotations

import torch
from swift.pipelines import SwiftSft
from swift.utils import get_logger

from higgs_ds.errors import UserError
from higgs_ds.eval.validation import AudioSamples, eval_data_config
from higgs_ds.models.interface import config_family, geometry
from higgs_ds.stream.loader import DataConfig, ShardStream
from higgs_ds.stream.reader import codec_mismatches, load_index
from higgs_ds.train.checkpoint import latest_complete
from higgs_ds.train.swift.template import HiggsAudioTemplate
from higgs_ds.train.swift.trainer import HiggsAudioTrainer, save_probe

logger = get_logger()


def check_codec_matches(index: dict, config, shard_dir: str) -> None:
    problems = codec_mismatches(index, geometry(config), shard_dir)
    if problems:
        raise UserError(problems[0])


def open_shard_stream(data: DataConfig, model_config, tokenizer) -> ShardStream:
    """This rank's stream over `data.shards`, once every index's codec is checked against the model."""
    for d in data.shards:
        check_codec_matches(load_index(d), model_config, d)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    stream = ShardStream(data, tokenizer, rank=rank, world_size=world, family=config_family(model_config))
    stream.check_workers(data.num_workers)  # now, not after the trainer is built
    logger.info(f"shard stream: rank {rank}/{world}, {stream.num_batches()} batches per epoch per rank")
    return stream


class HiggsSft(SwiftSft):
    """The `higgs-ds train` pipeline: the run config (not SWIFT's arguments) chooses the data and resume."""

    def __init__(self, args, run_cfg):
        self.run_cfg = run_cfg
        HiggsAudioTemplate.collator_mode = run_cfg.data.collator
        super().__init__(args)

    def _prepare_dataset(self):
        cfg, model_config, tokenizer = self.run_cfg, self.model.config, self.template.tokenizer
        train = open_shard_stream(cfg.data, model_config, tokenizer)
        val = (
            open_shard_stream(eval_data_config(cfg.eval, cfg.data), model_config, tokenizer)
            if cfg.eval.shards
            else None
        )
        if cfg.eval.generate:
            HiggsAudioTrainer.audio_samples = AudioSamples(cfg.eval, cfg.output_dir)
        return [train, val]

    def _get_resume_checkpoint(self, trainer):
        explicit = super()._get_resume_checkpoint(trainer)
        if explicit or self.run_cfg.resume in ("never", ""):
            return explicit
        if self.run_cfg.resume != "auto":
            return self.run_cfg.resume
        latest = latest_complete(self.run_cfg.output_dir)
        if latest is not None:
            logger.info(f"resuming from {latest}, the newest complete checkpoint in {self.run_cfg.output_dir}")
        return str(latest) if latest else None

    def train(self, trainer):
        result = super().train(trainer)
        if not trainer.stop_callback.stopped and self.run_cfg.save_probe:
            save_probe(trainer, self.run_cfg)
        return result
