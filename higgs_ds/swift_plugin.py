"""Stage 9 of the data flow, and the only module that imports ms-swift.

It registers Higgs-Audio v2 with ms-swift 4.x and runs SWIFT's own training loop (Seq2SeqTrainer on
HF Trainer, with DeepSpeed) with three replacements:

* model `higgs_audio`: boson's HiggsAudioModel loaded through AutoModel (never trust_remote_code);
* template `higgs_audio`: batches come from boson's HiggsAudioSampleCollator, and the loss is
  computed here (higgs_ds.loss) because the model's forward computes none;
* data: the per-rank, multi-worker shard stream (higgs_ds.dataloader) replaces ms-swift's rank-0
  streaming dispatcher, so every rank reads its own shards and yields the same number of batches.

Run it through `higgs-ds train` (higgs_ds.train), which builds the SWIFT arguments from the run config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import boson_multimodal.model.higgs_audio  # noqa: F401  registers AutoConfig/AutoModel "higgs_audio"
import torch
import torch.distributed.tensor  # noqa: F401  peft 0.20 on transformers 4.46 needs it imported first
from swift.model import ModelGroup, ModelLoader, ModelMeta, register_model
from swift.pipelines import SwiftSft
from swift.template import Template, register_template
from swift.template.templates.llama import Llama3TemplateMeta
from swift.trainers import Seq2SeqTrainer, TrainerFactory
from swift.utils import get_logger

from higgs_ds.callbacks import DenseLogCallback, StopRequestCallback, ThroughputCallback, device_peak_flops
from higgs_ds.checkpoint import latest_complete, read_data_state, stop_files, write_data_state
from higgs_ds.collate import BatchCollator, model_inputs
from higgs_ds.dataloader import EpochDataLoader, ShardStream
from higgs_ds.loss import LossConfig, higgs_loss
from higgs_ds.model_patches import patch_for_training
from higgs_ds.shard_reader import load_index

logger = get_logger()
MODEL_TYPE = TEMPLATE_TYPE = "higgs_audio"


class HiggsAudioLoader(ModelLoader):
    default_trust_remote_code = False  # boson's classes are imported, never fetched from a model repo
    activation_checkpointing = False  # set from the run config (TrainConfig.activation_checkpointing)

    def get_model(self, model_dir, config, processor, model_kwargs):
        from transformers import AutoModel

        self.auto_model_cls = AutoModel
        model = super().get_model(model_dir, config, processor, model_kwargs)
        # get_input_embeddings, PEFT's labels kwarg, activation checkpointing: see higgs_ds.model_patches
        patch_for_training(model, activation_checkpointing=self.activation_checkpointing)
        return model


class HiggsAudioTemplate(Template):
    support_padding_free = False
    use_model = False
    model_accepts_loss_kwargs = False  # the loss is a mean; HF must divide by accumulation steps
    loss_config = LossConfig()

    def _collator(self):
        if getattr(self, "_batch_collator", None) is None:
            self._batch_collator = BatchCollator(self.config)
        return self._batch_collator

    def data_collator(self, batch, *, padding_to=None):
        return self._collator()(batch)

    def compute_sft_loss(self, model, inputs, num_items_in_batch=None, trainer=None):
        outputs = model(**model_inputs(inputs))
        loss, metrics = higgs_loss(
            outputs.logits, outputs.expanded_labels, outputs.audio_logits, inputs["label_audio_ids"], self.loss_config
        )
        if trainer is not None:
            mode = "train" if model.training else "eval"
            for name, value in metrics.items():
                trainer.custom_metrics[mode][name].update(value)
            counts = getattr(trainer, "throughput_counts", None)
            if counts is not None and model.training:
                labels = inputs["label_audio_ids"][0]
                frames = ((labels != -100) & (labels != self.config.audio_stream_eos_id)).sum().item()
                counts["tokens"] += int(outputs.attention_mask.sum().item())
                counts["audio_seconds"] += frames / 25.0  # the codec's frame rate (checked against the shards)
                counts["sequences"] += int(inputs["input_ids"].shape[0])
        outputs["loss"] = loss  # item assignment: attribute assignment is lost on transformers 4.46
        outputs["logits"] = None  # SWIFT's token accuracy would compare expanded logits with unexpanded labels
        return outputs


register_model(
    ModelMeta(
        MODEL_TYPE,
        [ModelGroup([])],
        HiggsAudioLoader,
        template=TEMPLATE_TYPE,
        architectures=["HiggsAudioModel"],
        tags=["audio", "tts"],
    ),
    exist_ok=True,
)
register_template(
    Llama3TemplateMeta(TEMPLATE_TYPE, template_cls=HiggsAudioTemplate, default_system=None), exist_ok=True
)


class HiggsAudioTrainer(Seq2SeqTrainer):
    """SWIFT's trainer with the shard stream's own per-rank DataLoader (no rank-0 dispatcher), whose
    position is saved in every checkpoint and restored on resume (no batch is replayed or skipped)."""

    sample_log: str | None = None  # path for per-rank sample-id logs (TrainConfig.log_sample_ids)

    def get_train_dataloader(self, skip_batches=0):
        if skip_batches:  # ignore_data_skip is always on: the data position comes from the checkpoint
            raise RuntimeError("higgs-ds restores the data position itself; ignore_data_skip must stay true")
        stream = self.train_dataset
        self._higgs_loader = EpochDataLoader(stream, self.data_collator, stream.cfg.num_workers)
        return self._higgs_loader

    def _save_checkpoint(self, *args, **kwargs):
        ckpt = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        write_data_state(ckpt, self.args.process_index, self.args.world_size, self._higgs_loader.state_dict())
        run_cfg = Path(self.args.output_dir) / "higgs_ds_config.json"
        if self.args.process_index == 0 and run_cfg.is_file():  # the resolved run config travels with each checkpoint
            shutil.copy2(run_cfg, Path(ckpt) / run_cfg.name)
        return super()._save_checkpoint(*args, **kwargs)

    def _load_rng_state(self, checkpoint):
        # HF 4.46 loads its own rng_state files with torch.load(weights_only=True), which (torch >= 2.6)
        # refuses the numpy RNG state inside them; allow exactly those numpy types for this trusted file.
        import numpy as np

        allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        with torch.serialization.safe_globals(allowed):
            super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        state = read_data_state(checkpoint, self.args.process_index)
        if state is None:
            raise ValueError(
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
    codec = index["codec"]
    want = {
        "num_codebooks": config.audio_num_codebooks,
        "codebook_size": config.audio_codebook_size,
        "frame_rate": 25,
        "sample_rate": 24000,
    }  # every Higgs-Audio v2 model reads 25 Hz codes of 24 kHz audio
    for key, value in want.items():
        if codec.get(key) != value:
            raise ValueError(
                f"shards in {shard_dir} were built with a codec of {key}={codec.get(key)}, the model "
                f"expects {value}; rebuild the shards with the model's codec"
            )


class HiggsSft(SwiftSft):
    def __init__(self, args, run_cfg):
        self.run_cfg = run_cfg
        super().__init__(args)

    def _prepare_dataset(self):
        cfg = self.run_cfg
        for d in cfg.data.shards:
            check_codec_matches(load_index(d), self.model.config, d)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        stream = ShardStream(cfg.data, self.template.tokenizer, rank=rank, world_size=world)
        logger.info(f"shard stream: rank {rank}/{world}, {stream.num_batches()} batches per epoch per rank")
        return [stream, None]

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
        if trainer.args.process_index == 0:
            leftover = Path(self.run_cfg.output_dir) / "STOP"
            if leftover.exists():
                leftover.unlink()
                logger.info(f"removed a stop request left by an earlier run: {leftover}")
        if self.run_cfg.log_sample_ids:
            HiggsAudioTrainer.sample_log = os.path.join(self.run_cfg.output_dir, "samples_rank{rank}.jsonl")
        stop = StopRequestCallback(self.run_cfg.output_dir)
        trainer.add_callback(ThroughputCallback(trainer, self.run_cfg.peak_tflops * 1e12 or device_peak_flops()))
        trainer.add_callback(DenseLogCallback())
        trainer.add_callback(stop)
        result = super().train(trainer)
        if stop.stopped:
            logger.info(
                f"stopped on request at step {trainer.state.global_step}; its checkpoint is saved and the "
                "next run with this output_dir resumes from it"
            )
        else:
            if trainer.args.process_index == 0:  # a request that came after the last step: nothing to resume
                for path in stop_files(self.run_cfg.output_dir):
                    path.unlink(missing_ok=True)
            if self.run_cfg.save_probe:
                save_probe(trainer, self.run_cfg)
        return result


def save_probe(trainer, cfg) -> None:
    """Logits of the trained model (the live DeepSpeed engine) on one fixed batch, for export checks.
    Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 writes the file."""
    stream = ShardStream(cfg.data, trainer.template.tokenizer, rank=0, world_size=1)
    batch = trainer.data_collator(next(iter(stream)))  # the first micro-batch of epoch 0 seen by one rank
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    model.eval()
    device = next(trainer.model.parameters()).device
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    with torch.no_grad():
        out = model(**inputs)
    if trainer.args.process_index == 0:
        torch.save(
            {
                "batch": model_inputs(batch),
                "logits": out.logits.float().cpu(),
                "audio_logits": out.audio_logits.float().cpu(),
            },
            os.path.join(cfg.output_dir, "probe.pt"),
        )
        logger.info(f"saved probe logits to {cfg.output_dir}/probe.pt")


def _dtype(cfg) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def swift_argv(cfg) -> list[str]:
    dtype = _dtype(cfg)
    args = {
        "model": cfg.model,
        "model_type": MODEL_TYPE,
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
    if cfg.deepspeed:
        args["deepspeed"] = cfg.deepspeed
    if not torch.cuda.is_available():
        args["ddp_backend"] = "gloo"
        # transformers 4.46 builds accelerate's state with no backend on a CPU-only host and counts one
        # process; reuse the gloo state made in run_training instead.
        args["accelerator_config"] = '{"use_configured_state": true}'
    args.update(cfg.swift)
    argv = []
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_training(cfg) -> dict:
    HiggsAudioTemplate.loss_config = cfg.loss
    HiggsAudioLoader.activation_checkpointing = cfg.activation_checkpointing
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import accelerate

        if cfg.deepspeed:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        accelerate.PartialState(backend="gloo")
    return HiggsSft(swift_argv(cfg), cfg).main()
