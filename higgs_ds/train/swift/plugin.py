"""Stage 9 of the data flow, and the only module that imports ms-swift.

It registers Higgs-Audio v2 with ms-swift 4.x and runs SWIFT's own training loop (Seq2SeqTrainer on
HF Trainer, with DeepSpeed) with three replacements:

* model `higgs_audio`: boson's HiggsAudioModel loaded through AutoModel (never trust_remote_code);
* template `higgs_audio`: batches are boson's HiggsAudioSampleCollator's (higgs_ds.stream.collate, vectorised and
  checked against it), and the loss is computed here (higgs_ds.train.loss) because the model's forward computes none;
* data: the per-rank, multi-worker shard stream (higgs_ds.stream.loader) replaces ms-swift's rank-0
  streaming dispatcher, so every rank reads its own shards and yields the same number of batches.

Run it through `higgs-ds train` (higgs_ds.train.run), which builds the SWIFT arguments from the run config,
or from ms-swift's own CLI, where `--dataset` names shard directories:

    swift sft --external_plugins higgs_ds/train/swift/plugin.py --model DIR --model_type higgs_audio \
        --template higgs_audio --dataset SHARD_DIR [SHARD_DIR ...] --max_steps N --deepspeed ds_configs/zero3.json

Loaded that way (by path, under a module name SWIFT makes up), the plugin hooks SwiftSft at import: when
every --dataset entry is a shard directory the same per-rank stream is used, built from SWIFT's own
arguments (see `cli_data_config`); any other dataset goes through SWIFT's own loading, unchanged.

On import, for both paths (see the hooks below):

* no model directory runs code: transformers' remote code is replaced in the process (higgs_ds.models.trust),
  every model SWIFT resolves goes through check_model_dir first, and a hub id is refused, never downloaded;
* a UserError inside SWIFT's pipeline ends the process with one `higgs-ds: error:` line and exit code 2;
* credentials never reach a checkpoint: SWIFT's args.json is written redacted, and the training arguments
  pickle (training_args.bin) without hub_token and the like;
* a single process trains: without torchrun it gets a one-process environment for DeepSpeed, and the
  CPU gloo state is made (and reused by the trainer's arguments) only when there are several ranks.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
from pathlib import Path

import torch
import torch.distributed.tensor  # noqa: F401  peft 0.20 on transformers 4.46 needs it imported first
from swift.model import ModelGroup, ModelLoader, ModelMeta, register_model
from swift.pipelines import SwiftSft
from swift.template import Template, register_template
from swift.template.templates.llama import Llama3TemplateMeta
from swift.trainers import Seq2SeqTrainer, TrainerFactory
from swift.utils import get_logger
from transformers import AutoTokenizer
from transformers.modeling_outputs import CausalLMOutput

from higgs_ds.errors import UserError, exit_on_user_error
from higgs_ds.eval.validation import AudioSamples, EvalConfig, eval_data_config
from higgs_ds.models.family import BOSON, NATIVE, environment_family, model_family, require_model_family
from higgs_ds.models.interface import config_family, geometry, logits_for_loss, make_collator
from higgs_ds.models.patches import AUDIO_FFN_LINEARS, AUDIO_NORMS, AUDIO_SIDES, check_audio_side, patch_for_training
from higgs_ds.models.strict import check_state_dict_matches
from higgs_ds.models.trust import NOT_A_DIRECTORY, check_model_dir, forbid_remote_code
from higgs_ds.safe_io import atomic_write_bytes, atomic_write_text, is_secret_key, redact
from higgs_ds.shards.writer import INDEX_NAME
from higgs_ds.stream.loader import DataConfig, EpochDataLoader, ShardStream
from higgs_ds.stream.reader import codec_mismatches, load_index
from higgs_ds.train.callbacks import DenseLogCallback, StopRequestCallback, ThroughputCallback, device_peak_flops
from higgs_ds.train.checkpoint import (
    CheckpointError,
    is_complete,
    latest_complete,
    read_data_state,
    stop_files,
    write_data_state,
)
from higgs_ds.train.loss import LossConfig, higgs_loss, target_counts

if environment_family() == BOSON:
    import boson_multimodal.model.higgs_audio  # noqa: F401  registers AutoConfig/AutoModel "higgs_audio"

# Before SWIFT loads anything: no config, tokenizer or model may run code of its own (see model_trust).
forbid_remote_code()
logger = get_logger()
# SWIFT model types, one per family (the family of --model must match: see HiggsAudioLoader); one template.
MODEL_TYPES = {NATIVE: "higgs_audio_v2", BOSON: "higgs_audio"}
TEMPLATE_TYPE = "higgs_audio"


class HiggsAudioLoader(ModelLoader):
    """Either family's model class (never trust_remote_code), loaded strictly: every weight of the directory
    used and none missing (transformers only warns). A directory of the other family is a one-line error."""

    default_trust_remote_code = False  # the classes are imported, never fetched from a model repo
    activation_checkpointing = False  # set from the run config (TrainConfig.activation_checkpointing)
    train_modules = "all"  # TrainConfig.train_modules; the freezing itself is SWIFT's (see _tuner_args)

    def get_processor(self, model_dir, config):
        # The tokenizer only: training reads codes from the shards, and a native directory's processor config
        # names its codec by hub id (bosonai/higgs-audio-v2-tokenizer), which AutoProcessor would download.
        self.auto_tokenizer_cls = AutoTokenizer
        return super().get_processor(model_dir, config)

    def get_model(self, model_dir, config, processor, model_kwargs):
        family = require_model_family(model_dir)
        if family == NATIVE:
            from transformers import HiggsAudioV2ForConditionalGeneration

            # the text head is a constructor argument; without it the checkpoint's text_lm_head is dropped
            self.auto_model_cls = HiggsAudioV2ForConditionalGeneration
            model_kwargs = dict(model_kwargs, use_text_head=True)
        else:
            from transformers import AutoModel

            self.auto_model_cls = AutoModel
        model = super().get_model(model_dir, config, processor, model_kwargs)
        check_state_dict_matches(model_dir, _expected_shapes(model), f"the {family} Higgs-Audio v2 class")
        if self.train_modules == "audio":
            check_audio_side(model)  # before the trainer: a wrong model fails in seconds, not after setup
        if family == BOSON:  # get_input_embeddings, PEFT's labels kwarg, checkpointing: see models.patches
            patch_for_training(model, activation_checkpointing=self.activation_checkpointing)
        elif self.activation_checkpointing:  # the native class supports HF's own switch
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model


def _expected_shapes(model) -> dict[str, tuple]:
    """The checkpoint keys and shapes the loaded class expects (ZeRO-3 partitions report their full shape
    in ds_shape), persistent buffers included."""
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in persistent})
    return shapes


class HiggsAudioTemplate(Template):
    support_padding_free = False
    use_model = False
    model_accepts_loss_kwargs = False  # HF divides by accumulation steps; the loss scales for it (higgs_ds.train.loss)
    loss_config = LossConfig()
    collator_mode = "fast"  # DataConfig.collator

    def _collator(self):
        if getattr(self, "_batch_collator", None) is None:
            self._batch_collator = make_collator(self.config, self.tokenizer, self.collator_mode)
        return self._batch_collator

    def data_collator(self, batch, *, padding_to=None):
        return self._collator()(batch)

    def compute_sft_loss(self, model, inputs, num_items_in_batch=None, trainer=None):
        out = logits_for_loss(model, inputs, config_family(self.config))
        counts, scale = None, 1.0
        if trainer is not None and model.training and getattr(trainer, "step_target_counts", None) is not None:
            # token-mean over the whole optimizer step (see higgs_ds.train.loss); check the up-front text count
            counts = trainer.step_target_counts
            scale = trainer.args.gradient_accumulation_steps * trainer.args.world_size
            num_codebooks = geometry(self.config).num_codebooks
            expected = target_counts(inputs["label_ids"], inputs["label_audio_ids"], num_codebooks)
            actual = int((out.text_labels[:, 1:] != -100).sum())
            if actual != int(expected[0]):
                raise RuntimeError(
                    f"text targets: {actual} in the expanded labels, {int(expected[0])} counted up front"
                )
        loss, metrics = higgs_loss(
            out.text_logits,
            out.text_labels,
            out.audio_logits,
            inputs["label_audio_ids"],
            self.loss_config,
            global_counts=counts,
            scale=scale,
        )
        if trainer is not None:
            mode = "train" if model.training else "eval"
            for name, value in metrics.items():
                trainer.custom_metrics[mode][name].update(value)
            counts = getattr(trainer, "throughput_counts", None)
            if counts is not None and model.training:
                labels = inputs["label_audio_ids"][0]
                frames = ((labels != -100) & (labels != self.config.audio_stream_eos_id)).sum().item()
                counts["tokens"] += out.attended
                counts["audio_seconds"] += frames / 25.0  # the codec's frame rate (checked against the shards)
                counts["sequences"] += int(inputs["input_ids"].shape[0])
        # Only the loss goes back (logits None): SWIFT's token accuracy would compare expanded logits with
        # unexpanded labels. A ModelOutput, because SWIFT reads it both as a dict and by attribute.
        return CausalLMOutput(loss=loss, logits=None)


for _family, _architecture in ((NATIVE, "HiggsAudioV2ForConditionalGeneration"), (BOSON, "HiggsAudioModel")):
    register_model(
        ModelMeta(
            MODEL_TYPES[_family],
            [ModelGroup([])],
            HiggsAudioLoader,
            template=TEMPLATE_TYPE,
            architectures=[_architecture],
            tags=["audio", "tts"],
        ),
        exist_ok=True,
    )
register_template(
    Llama3TemplateMeta(TEMPLATE_TYPE, template_cls=HiggsAudioTemplate, default_system=None), exist_ok=True
)


# Settings of the shard stream that SWIFT has no flag for, read from the environment on the
# `swift sft` path (`higgs-ds train` takes them from its config instead).
ENV_MAX_TOKENS = "HIGGS_DS_MAX_TOKENS"  # data.max_tokens: budget batching instead of a fixed batch size
ENV_MAX_LENGTH = "HIGGS_DS_MAX_LENGTH"  # data.max_length (SWIFT's --max_length defaults to the model's context)
ENV_PEAK_TFLOPS = "HIGGS_DS_PEAK_TFLOPS"  # peak_tflops, for the mfu metric
ENV_LOG_SAMPLE_IDS = "HIGGS_DS_LOG_SAMPLE_IDS"  # "1": log_sample_ids (output_dir/samples_rank{R}.jsonl)
ENV_TEXT_WEIGHT = "HIGGS_DS_TEXT_WEIGHT"  # loss.text_weight
ENV_CODEBOOK_WEIGHTS = "HIGGS_DS_CODEBOOK_WEIGHTS"  # loss.codebook_weights, comma-separated: "2,1,1,1,1,1,1,1"
ENV_LOADER_TIMEOUT = "HIGGS_DS_LOADER_TIMEOUT"  # data.loader_timeout: seconds a rank waits for a worker's batch


def _env_number(name: str, kind=int):
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"${name} must be a number, got {value!r}") from None


class HiggsAudioTrainer(Seq2SeqTrainer):
    """SWIFT's trainer with the shard stream's own per-rank DataLoader (no rank-0 dispatcher), whose
    position is saved in every checkpoint and restored on resume (no batch is replayed or skipped), and
    higgs-ds' callbacks (throughput metrics, the dense log line, stop requests)."""

    sample_log: str | None = None  # path for per-rank sample-id logs (TrainConfig.log_sample_ids)
    audio_samples: AudioSamples | None = None  # eval.generate: prompts generated at each evaluation
    peak_tflops: float = 0.0  # TrainConfig.peak_tflops; 0: $HIGGS_DS_PEAK_TFLOPS, else known GPUs

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            # HF takes every forward argument named *label* as a label key (the native class: labels and
            # audio_labels) and computes no evaluation loss when one is missing; our batches carry `labels`.
            self.label_names = ["labels"]
        # Added here, not by the pipeline, so that `higgs-ds train` and `swift sft` get the same set;
        # each only once, whoever else (e.g. SWIFT's --callbacks) may have added one.
        peak = (self.peak_tflops or _env_number(ENV_PEAK_TFLOPS, float) or 0.0) * 1e12 or device_peak_flops()
        for callback in (ThroughputCallback(self, peak), DenseLogCallback(), StopRequestCallback(self.args.output_dir)):
            if not any(isinstance(cb, type(callback)) for cb in self.callback_handler.callbacks):
                self.add_callback(callback)
        self.stop_callback = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, StopRequestCallback))
        if self.sample_log is None and os.environ.get(ENV_LOG_SAMPLE_IDS, "") == "1":
            self.sample_log = os.path.join(self.args.output_dir, "samples_rank{rank}.jsonl")

    def get_train_dataloader(self, skip_batches=0):
        stream = self.train_dataset
        if not isinstance(stream, ShardStream):  # a dataset SWIFT loaded itself (not shard directories)
            return super().get_train_dataloader(skip_batches)
        if skip_batches:  # the data position comes from the checkpoint, nothing is re-read
            raise RuntimeError(
                "higgs-ds restores the data position itself: pass --ignore_data_skip true (it must stay true)"
            )
        self._higgs_loader = EpochDataLoader(stream, self.data_collator, stream.cfg.num_workers, endless=True)
        return self._higgs_loader

    def get_eval_dataloader(self, eval_dataset=None):
        stream = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(stream, ShardStream):
            return super().get_eval_dataloader(eval_dataset)
        stream.epoch, stream.start_batch = 0, 0  # every evaluation reads the same batches in the same order
        return EpochDataLoader(stream, self.data_collator, stream.cfg.num_workers)

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.audio_samples is not None:  # every rank generates (ZeRO-3 lockstep); rank 0 writes
            writer = next((cb.tb_writer for cb in self.callback_handler.callbacks if hasattr(cb, "tb_writer")), None)
            was_training = self.model.training
            self.audio_samples.run(
                self.model,
                self.template.tokenizer,
                self.state.global_step,
                writer=writer,
                is_main=self.args.process_index == 0,
            )
            self.model.train(was_training)
        return metrics

    def get_batch_samples(self, epoch_iterator, num_batches, *device):
        """HF fetches an optimizer step's micro-batches up front; count their loss targets here, summed
        over the ranks, so every micro-batch's loss is normalised by the step's global target count.
        (transformers 5 passes the device too; 4.46 does not.)"""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, *device)
        if not batches:  # HF's extra fetch at an epoch's end; empty on every rank alike (equal batches)
            return batches, None
        num_codebooks = geometry(self.model.config).num_codebooks
        counts = torch.zeros(1 + num_codebooks, dtype=torch.float64)
        for batch in batches:
            counts += target_counts(batch["label_ids"], batch["label_audio_ids"], num_codebooks)
        if torch.distributed.is_initialized() and self.args.world_size > 1:  # every rank runs the same steps
            counts = counts.to(self.args.device)
            torch.distributed.all_reduce(counts)
        self.step_target_counts = counts.cpu()
        # text + per-codebook audio targets of the whole step (all ranks): what the loss is a mean over
        self.custom_metrics["train"]["target_tokens"].update(counts.sum().cpu())
        return batches, None

    def train(self, *args, **kwargs):
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if isinstance(resume, str) and not is_complete(resume):  # an explicit resume = PATH / --resume_from_...
            raise CheckpointError(
                f"checkpoint {resume} is not complete (a file is missing, torn or does not parse, e.g. "
                "trainer_state.json after a full disk): resume from an earlier checkpoint-N of the run, or "
                'set resume = "auto" to take the newest complete one'
            )
        stop_file = Path(self.args.output_dir) / "STOP"
        if self.args.process_index == 0 and stop_file.exists():
            stop_file.unlink()
            logger.info(f"removed a stop request left by an earlier run: {stop_file}")
        result = super().train(*args, **kwargs)
        if self.stop_callback.stopped:
            logger.info(
                f"stopped on request at step {self.state.global_step}; its checkpoint is saved and the "
                "next run with this output_dir resumes from it"
            )
        elif self.args.process_index == 0:  # a request that came after the last step: nothing to resume
            for path in stop_files(self.args.output_dir):
                path.unlink(missing_ok=True)
        return result

    def _save_checkpoint(self, *args, **kwargs):
        loader = getattr(self, "_higgs_loader", None)
        if loader is not None:
            ckpt = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            write_data_state(ckpt, self.args.process_index, self.args.world_size, loader.state_dict())
            run_cfg = Path(self.args.output_dir) / "higgs_ds_config.json"
            if self.args.process_index == 0 and run_cfg.is_file():  # the resolved run config travels along
                # (written redacted by higgs_ds.train.run: no credential reaches a checkpoint)
                atomic_write_bytes(Path(ckpt) / run_cfg.name, run_cfg.read_bytes())
        return super()._save_checkpoint(*args, **kwargs)

    def _load_rng_state(self, checkpoint):
        # HF 4.46 loads its own rng_state files with torch.load(weights_only=True), which (torch >= 2.6)
        # refuses the numpy RNG state inside them; allow exactly those numpy types for this trusted file.
        import numpy as np

        allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        with torch.serialization.safe_globals(allowed):
            super()._load_rng_state(checkpoint)
        if checkpoint is None or getattr(self, "_higgs_loader", None) is None:
            return
        state = read_data_state(checkpoint, self.args.process_index)
        if state is None:
            raise CheckpointError(
                f"{checkpoint} holds no data position for rank {self.args.process_index}: it was not "
                "written by higgs-ds training, so the run cannot continue with the next sample"
            )
        self._higgs_loader.load_state_dict(state)
        logger.info(f"data position restored: epoch {state['epoch']}, {state['batches_done']} batches done")

    def training_step(self, model, inputs, *args, **kwargs):
        if self.sample_log:
            with open(self.sample_log.format(rank=self.args.process_index), "a") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "ids": inputs.get("sample_ids")}) + "\n")
        return super().training_step(model, inputs, *args, **kwargs)


TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{__name__}.HiggsAudioTrainer"


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
    stream = ShardStream(data, tokenizer, rank=rank, world_size=world)
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


# ---- `swift sft --external_plugins higgs_ds/train/swift/plugin.py`: SwiftSft itself, hooked at import ----


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
        max_tokens=_env_number(ENV_MAX_TOKENS),
        max_length=_env_number(ENV_MAX_LENGTH),
        num_workers=training.dataloader_num_workers,  # SWIFT's default when not given: 1
        seed=args.data_seed,
        **({"loader_timeout": timeout} if (timeout := _env_number(ENV_LOADER_TIMEOUT, float)) is not None else {}),
    )


def cli_loss_config(num_codebooks: int) -> LossConfig:
    """loss.text_weight and loss.codebook_weights from the environment (SWIFT has no flags for them)."""
    text_weight = _env_number(ENV_TEXT_WEIGHT, float)
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
        return  # already hooked (the plugin imported twice, e.g. by path and as higgs_ds.train.swift.plugin)
    swift_prepare_model_tokenizer = SwiftSft._prepare_model_tokenizer
    swift_prepare_dataset = SwiftSft._prepare_dataset

    @_user_errors_exit
    def _prepare_model_tokenizer(self, **kwargs):
        # Check the shards (index, codec) before the model is loaded, which takes minutes at full size.
        shards = cli_shard_dirs(self.args)
        if shards:
            from transformers import AutoConfig  # boson's config class, registered on import above

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


def configure_single_process(use_deepspeed: bool) -> None:
    """A run started without torchrun (`higgs-ds train CONFIG` on a laptop, `swift sft` without
    NPROC_PER_NODE) is one rank of one. DeepSpeed still initialises a process group, and without torchrun's
    environment it goes looking for MPI (mpi4py, absent); give it the environment of a one-process torchrun
    on a free local port instead."""
    if not use_deepspeed or any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return
    if multiprocessing.parent_process() is not None:
        return  # a dataloader worker re-importing the plugin
    import socket

    with socket.socket() as s:  # a free port, so two single-process runs on one host do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    os.environ.update(env)
    os.environ.setdefault("MASTER_PORT", str(port))


def configure_cpu_ranks(use_deepspeed: bool) -> None:
    """On a CPU-only host with several ranks, create accelerate's state with the gloo backend before the
    trainer's arguments do: transformers 4.46 builds it there with no backend and counts one process.
    The trainer reuses it with --ddp_backend gloo --accelerator_config '{"use_configured_state": true}'."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.distributed.is_initialized() or multiprocessing.parent_process() is not None:
        return  # already set up, or a dataloader worker re-importing the plugin: never a second group
    import accelerate

    if use_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    accelerate.PartialState(backend="gloo")


def _reuse_cpu_state_in_training_args() -> None:
    """`--ddp_backend gloo --accelerator_config '{"use_configured_state": true}'`, given for the user, when
    configure_cpu_ranks made the gloo state (several CPU ranks), and only then: with one process there is no
    state to reuse and accelerate refuses the flag. SftArguments builds the trainer's arguments (and sets up
    their devices) through TrainerFactory.get_training_args, after importing the plugin (`swift sft`) or
    after run_training made the state (`higgs-ds train`)."""
    swift_get_training_args = TrainerFactory.get_training_args
    if getattr(swift_get_training_args, "higgs_ds_hook", False):
        return  # the plugin imported twice (by path and as higgs_ds.train.swift.plugin)

    def get_training_args(cls, args):
        from accelerate import PartialState

        if not torch.cuda.is_available() and PartialState._shared_state:  # made by configure_cpu_ranks
            args.ddp_backend = args.ddp_backend or "gloo"
            config = args.accelerator_config
            if isinstance(config, str) and not os.path.isfile(config):  # inline JSON, not a file
                config = json.loads(config)
            if isinstance(config, dict):
                args.accelerator_config = dict(config, use_configured_state=True)
        return swift_get_training_args(args)

    get_training_args.higgs_ds_hook = True
    TrainerFactory.get_training_args = classmethod(get_training_args)


_reuse_cpu_state_in_training_args()


def _guard_swift_model_loading() -> None:
    """Every model SWIFT resolves (`--model`, and HiggsSft's) passes get_model_info_meta, which resolves the
    path (downloading a hub id) and then reads its config with trust_remote_code=True. There: a hub id is
    refused (higgs-ds never downloads), a local directory goes through check_model_dir before anything in
    it is read; and SWIFT's hub downloads are refused wherever else they are asked for. This runs inside
    SWIFT's argument parsing, so a refusal ends the process with the policy's line and exit code 2."""
    from swift.hub import hub
    from swift.model import model_meta

    resolve = model_meta.safe_snapshot_download
    if getattr(resolve, "higgs_ds_hook", False):
        return

    def local_model_dir(model_id_or_path, *args, **kwargs):
        try:
            check_model_dir(model_id_or_path)
        except UserError as err:
            raise exit_on_user_error(err) from None
        return resolve(model_id_or_path, *args, **kwargs)

    def no_download(cls, model_id_or_path=None, *args, **kwargs):
        err = UserError(f"model {model_id_or_path} is not a local directory; {NOT_A_DIRECTORY}")
        raise exit_on_user_error(err)

    local_model_dir.higgs_ds_hook = True
    model_meta.safe_snapshot_download = local_model_dir
    for hub_class in (hub.MSHub, hub.HFHub):
        hub_class.download_model = classmethod(no_download)


_guard_swift_model_loading()


def _pickled_without_credentials(cls) -> None:
    """HF/SWIFT write `torch.save(trainer.args)` as training_args.bin into every checkpoint (and into a Hub
    push): pickling these arguments leaves credentials out (hub_token and the like become None, token-like
    values elsewhere '<redacted>'), while the live object keeps them for the push itself. Copies in memory
    (copy/deepcopy, which would go through the same pickling hook) stay whole."""
    if cls.__dict__.get("higgs_ds_redacted_pickle", False):
        return

    def __getstate__(self):
        return {
            key: None if is_secret_key(key) and isinstance(value, str) else redact(value)
            for key, value in self.__dict__.items()
        }

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    cls.__getstate__, cls.__copy__, cls.__deepcopy__ = __getstate__, __copy__, __deepcopy__
    cls.higgs_ds_redacted_pickle = True


def _save_swift_args_redacted() -> None:
    """SWIFT's args.json (output_dir, copied into every checkpoint) and its copy of a `swift sft CONFIG.yaml`
    are written with credentials redacted (SWIFT itself drops only keys containing '_token'), atomically."""
    from swift.arguments import BaseArguments
    from swift.utils import check_json_format, is_master

    if getattr(BaseArguments.save_args, "higgs_ds_hook", False):
        return

    def save_args(self, output_dir=None) -> None:
        if not is_master():
            return
        output_dir = output_dir or self.output_dir
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "args.json")
        logger.info(f"The {self.__class__.__name__} will be saved in: {path} (credentials redacted)")
        text = json.dumps(redact(check_json_format(self.__dict__)), ensure_ascii=False, indent=2)
        atomic_write_text(path, text)
        config_file = os.getenv("SWIFT_CONFIG_FILE")
        if config_file:
            _copy_config_redacted(config_file, output_dir)

    save_args.higgs_ds_hook = True
    BaseArguments.save_args = save_args


def _copy_config_redacted(config_file: str, output_dir: str) -> None:
    import yaml

    text = Path(config_file).read_text(encoding="utf-8")
    values = yaml.safe_load(text)  # SWIFT has read it already: JSON or YAML
    clean = redact(values)
    if clean != values:
        text = json.dumps(clean, indent=2) if config_file.endswith(".json") else yaml.safe_dump(clean, sort_keys=False)
    atomic_write_text(Path(output_dir) / Path(config_file).name, text)


def _keep_credentials_out_of_checkpoints() -> None:
    from swift.arguments import BaseArguments
    from transformers import TrainingArguments

    _pickled_without_credentials(TrainingArguments)  # the base of SWIFT's Seq2SeqTrainingArguments
    _pickled_without_credentials(BaseArguments)
    _save_swift_args_redacted()


_keep_credentials_out_of_checkpoints()


def save_probe(trainer, cfg) -> None:
    """Logits of the trained model (the live DeepSpeed engine) on one fixed batch, for export checks.
    Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 writes the file."""
    stream = ShardStream(cfg.data, trainer.template.tokenizer, rank=0, world_size=1)
    batch = trainer.data_collator(next(iter(stream)))  # the first micro-batch of epoch 0 seen by one rank
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    model.eval()
    device = next(trainer.model.parameters()).device
    family = config_family(trainer.model.config)
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        out = logits_for_loss(model, {k: v.to(device) for k, v in tensors.items()}, family)
    if trainer.args.process_index == 0:
        torch.save(
            {
                "family": family,
                "batch": tensors,
                "logits": out.text_logits.float().cpu(),
                "audio_logits": out.audio_logits.float().cpu(),
            },
            os.path.join(cfg.output_dir, "probe.pt"),
        )
        logger.info(f"saved probe logits to {cfg.output_dir}/probe.pt")


def _dtype(cfg) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def _tuner_args(cfg, family: str) -> dict:
    """SWIFT's tuner arguments for cfg.tuner and cfg.train_modules (see TrainConfig.train_modules)."""
    audio = AUDIO_SIDES[family]
    if cfg.tuner == "lora" and cfg.train_modules == "audio":
        return {
            "lora_rank": cfg.lora_rank,
            "target_regex": rf"(.*\.)?{AUDIO_FFN_LINEARS}",  # PEFT full-matches module names
            # trained in full beside the adapters; PEFT matches these as module-name suffixes, which
            # text_lm_head, input_layernorm and post_attention_layernorm do not end with
            "modules_to_save": [*audio.head_and_embeddings, *AUDIO_NORMS],
        }
    if cfg.tuner == "lora":  # SWIFT's all-linear: every nn.Linear but the heads (*lm_head)
        return {"lora_rank": cfg.lora_rank, "target_modules": "all-linear"}
    if cfg.train_modules == "audio":
        # SWIFT's own freezing, applied to the loaded model before DeepSpeed is initialised: frozen
        # parameters get no optimizer state, and checkpoints still hold every weight.
        return {"freeze_parameters_ratio": 1, "trainable_parameters_regex": audio.parameters}
    return {}


def swift_argv(cfg) -> list[str]:
    dtype = _dtype(cfg)
    # the model directory's family (a missing or foreign one is refused by HiggsAudioLoader, with the reason)
    family = model_family(cfg.model) if Path(cfg.model, "config.json").is_file() else environment_family()
    args = {
        "model": cfg.model,
        "model_type": MODEL_TYPES[family],
        "template": TEMPLATE_TYPE,
        "tuner_type": cfg.tuner,
        "dataset": cfg.data.shards[0] if cfg.data.shards else "none",  # never loaded: HiggsSft injects the stream
        "streaming": "true",
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.learning_rate,
        "warmup_steps": cfg.warmup_steps,
        "lr_scheduler_type": cfg.lr_scheduler,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "torch_dtype": dtype,
        "bf16": str(dtype == "bfloat16").lower(),
        "fp16": "false",
        "save_steps": cfg.save_steps,
        "logging_steps": cfg.logging_steps,
        "seed": cfg.seed,
        "output_dir": cfg.output_dir,
        "logging_dir": os.path.join(cfg.output_dir, "logs"),
        "add_version": "false",
        "report_to": "tensorboard",
        "ddp_timeout": cfg.ddp_timeout,
        "check_model": "false",
        "gradient_checkpointing": "false",
        "remove_unused_columns": "false",
        "dataloader_num_workers": 0,
        "save_only_model": "false",
        "ignore_data_skip": "true",  # the data position is restored from the checkpoint, not re-read
    }
    args.update(_tuner_args(cfg, family))
    if cfg.eval.shards:  # SWIFT evaluates only with a val_dataset; never loaded: HiggsSft injects the stream
        args.update(
            val_dataset=cfg.eval.shards[0],
            eval_strategy="steps",
            eval_steps=cfg.eval.steps,
            per_device_eval_batch_size=cfg.eval.batch_size or cfg.data.batch_size,
            prediction_loss_only="true",  # the loss and metrics only; no logits gathered across ranks
        )
    if cfg.deepspeed:
        args["deepspeed"] = cfg.deepspeed
    args.update(cfg.swift)
    argv = []
    for key, value in args.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def run_training(cfg) -> dict:
    HiggsAudioTemplate.loss_config = cfg.loss
    HiggsAudioLoader.activation_checkpointing = cfg.activation_checkpointing
    HiggsAudioLoader.train_modules = cfg.train_modules
    HiggsAudioTrainer.peak_tflops = cfg.peak_tflops
    HiggsAudioTrainer.sample_log = (
        os.path.join(cfg.output_dir, "samples_rank{rank}.jsonl") if cfg.log_sample_ids else None
    )
    configure_single_process(bool(cfg.deepspeed))
    configure_cpu_ranks(bool(cfg.deepspeed))
    if int(os.environ.get("RANK", "0")) == 0:
        # HF's trainer states the run's size on INFO, under the warning level SWIFT leaves it at; among
        # it "Number of trainable parameters = N", counted at full size under ZeRO-3 (what train_modules left).
        logging.getLogger("transformers.trainer").setLevel(logging.INFO)
    return HiggsSft(swift_argv(cfg), cfg).main()
