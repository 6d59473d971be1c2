"""`swift sft --external_plugins higgs_ds/swift_plugin.py`: SwiftSft itself, hooked at import.

From ms-swift's own CLI, `--dataset` names shard directories:

    swift sft --external_plugins higgs_ds/swift_plugin.py --model DIR --model_type higgs_audio_v2 \
        --template higgs_audio --dataset SHARD_DIR [SHARD_DIR ...] --max_steps N --deepspeed ds_configs/zero3.json

When every --dataset entry is a shard directory, the same per-rank stream as `higgs-ds train`'s is used, built
from SWIFT's own arguments (see `cli_data_config`) and the environment (higgs_ds.train.swift.env); any other
dataset goes through SWIFT's own loading, unchanged. The shards' codecs are checked before the model is
loaded, and a UserError anywhere in SWIFT's pipeline (HiggsSft's included) ends the process with one
`higgs-ds: error:` line and exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from swift.pipelines import SwiftSft
from swift.utils import get_logger

from higgs_ds.errors import UserError, exit_on_user_error
from higgs_ds.eval.validation import EvalConfig, eval_data_config
from higgs_ds.models.interface import geometry
from higgs_ds.shards.writer import INDEX_NAME
from higgs_ds.stream.loader import DataConfig
from higgs_ds.stream.reader import load_index
from higgs_ds.train.loss import LossConfig
from higgs_ds.train.swift.env import (
    ENV_CODEBOOK_WEIGHTS,
    ENV_LOADER_TIMEOUT,
    ENV_MAX_LENGTH,
    ENV_MAX_TOKENS,
    ENV_TEXT_WEIGHT,
    env_number,
)
from higgs_ds.train.swift.pipeline import check_codec_matches, open_shard_stream
from higgs_ds.train.swift.register import TEMPLATE_TYPE
from higgs_ds.train.swift.template import HiggsAudioTemplate

logger = get_logger()


def cli_shard_dirs(args) -> list[str] | None:
    """The shard directories named by SWIFT's --dataset, or None when SWIFT's own loading applies.
    Raises UserError for what cannot be trained: a folder without index.json given to the higgs_audio
    template, shard directories mixed with other datasets, a split of a stream."""
    entries = [str(e) for e in (args.dataset or [])]
    dirs = [e for e in entries if os.path.isdir(e)]
    indexed = [d for d in dirs if Path(d, INDEX_NAME).is_file()]
    if not indexed and (not dirs or args.template != TEMPLATE_TYPE):
        return None  # not shards: SWIFT's own datasets (its folder datasets included)
    if len(dirs) < len(entries):
        others = [e for e in entries if e not in dirs]
        raise UserError(
            f"--dataset mixes shard directories with other datasets ({', '.join(others)}); pass only shard directories"
        )
    missing = [d for d in dirs if d not in indexed]
    if missing:
        raise UserError(
            f"--dataset {missing[0]} has no {INDEX_NAME}: it is not a shard directory; build one with "
            "`higgs-ds shards build MANIFEST --out DIR --codec CODEC`"
        )
    if args.split_dataset_ratio:
        raise UserError(
            "--split_dataset_ratio cannot split a shard stream: build validation shards and pass them as "
            "--val_dataset DIR (and --split_dataset_ratio 0)"
        )
    return dirs


def cli_val_dirs(args) -> list[str]:
    """Validation shard directories named by --val_dataset (each with an index.json)."""
    dirs = [str(e) for e in (args.val_dataset or [])]
    for d in dirs:
        if not Path(d, INDEX_NAME).is_file():
            raise UserError(
                f"--val_dataset {d} is not a shard directory (no {INDEX_NAME}); build it with `higgs-ds shards build`"
            )
    return dirs


def cli_data_config(args, shards: list[str]) -> DataConfig:
    """The shard stream's settings from SWIFT's arguments (read before the trainer is built: SwiftMixin
    then sets dataloader_num_workers to 1 for any iterable dataset, but the stream's own DataLoader keeps
    the number given here), and the environment for what SWIFT has no flag for."""
    training = args.training_args
    return DataConfig(
        shards=shards,
        batch_size=training.per_device_train_batch_size,
        max_tokens=env_number(ENV_MAX_TOKENS),
        max_length=env_number(ENV_MAX_LENGTH),
        num_workers=training.dataloader_num_workers,  # SWIFT's default when not given: 1
        seed=args.data_seed,
        **({"loader_timeout": timeout} if (timeout := env_number(ENV_LOADER_TIMEOUT, float)) is not None else {}),
    )


def cli_loss_config(num_codebooks: int) -> LossConfig:
    """loss.text_weight and loss.codebook_weights from the environment (SWIFT has no flags for them)."""
    text_weight = env_number(ENV_TEXT_WEIGHT, float)
    raw = os.environ.get(ENV_CODEBOOK_WEIGHTS, "").strip()
    try:
        weights = tuple(float(w) for w in raw.split(",")) if raw else None
    except ValueError:
        raise UserError(f"${ENV_CODEBOOK_WEIGHTS} must be comma-separated numbers, got {raw!r}") from None
    if weights is not None and (len(weights) != num_codebooks or min(weights) < 0 or sum(weights) <= 0):
        raise UserError(f"${ENV_CODEBOOK_WEIGHTS} needs {num_codebooks} weights >= 0, not all 0; got {raw!r}")
    return LossConfig(text_weight=1.0 if text_weight is None else text_weight, codebook_weights=weights)


def _user_errors_exit(method):
    """Run a hooked SwiftSft step; a UserError ends the process with the policy's one line and exit 2,
    not a traceback (the step runs inside SWIFT's main, or HiggsSft's under `higgs-ds train`)."""

    def hooked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except UserError as err:
            raise exit_on_user_error(err) from None

    hooked.__name__ = hooked.__qualname__ = method.__name__
    hooked.higgs_ds_hook = True
    return hooked


def _install_cli_hooks() -> None:
    if getattr(SwiftSft._prepare_dataset, "higgs_ds_hook", False):
        return  # already hooked (this module imported twice, e.g. by path and by name)
    swift_prepare_model_tokenizer = SwiftSft._prepare_model_tokenizer
    swift_prepare_dataset = SwiftSft._prepare_dataset

    @_user_errors_exit
    def _prepare_model_tokenizer(self, **kwargs):
        # Check the shards (index, codec) before the model is loaded, which takes minutes at full size.
        shards = cli_shard_dirs(self.args)
        if shards:
            from transformers import AutoConfig  # boson's config class, registered by .register

            config = AutoConfig.from_pretrained(self.args.model_info.model_dir)
            for d in [*shards, *cli_val_dirs(self.args)]:
                check_codec_matches(load_index(d), config, d)
        return swift_prepare_model_tokenizer(self, **kwargs)

    @_user_errors_exit
    def _prepare_dataset(self):
        shards = cli_shard_dirs(self.args)
        if shards is None:
            return swift_prepare_dataset(self)
        if self.args.training_args.max_steps <= 0:
            raise UserError("a shard stream has no length: pass --max_steps N")
        if not self.args.training_args.ignore_data_skip:
            # Resuming must not re-read batches: each checkpoint holds every rank's data position.
            self.args.ignore_data_skip = self.args.training_args.ignore_data_skip = True
            logger.info("setting ignore_data_skip: true (the data position is restored from the checkpoint)")
        data = cli_data_config(self.args, shards)
        logger.info(f"higgs-ds data from SWIFT's arguments: {data}")
        HiggsAudioTemplate.loss_config = cli_loss_config(geometry(self.model.config).num_codebooks)
        logger.info(f"higgs-ds loss: {HiggsAudioTemplate.loss_config}")
        val = None
        val_dirs = cli_val_dirs(self.args)
        if val_dirs:
            eval_cfg = EvalConfig(shards=val_dirs, batch_size=self.args.per_device_eval_batch_size)
            val = open_shard_stream(eval_data_config(eval_cfg, data), self.model.config, self.template.tokenizer)
        return [open_shard_stream(data, self.model.config, self.template.tokenizer), val]

    SwiftSft._prepare_model_tokenizer = _prepare_model_tokenizer
    SwiftSft._prepare_dataset = _prepare_dataset
    # the rest of the pipeline (trainer, training loop): a UserError there ends the same way
    SwiftSft.run = _user_errors_exit(SwiftSft.run)


_install_cli_hooks()
