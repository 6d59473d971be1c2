"""`higgs-ds train`'s run (called by higgs_ds.train.run): the SWIFT arguments of a run config (swift_argv),
the class-level settings SWIFT has no arguments for, the process set-up, and HiggsSft's main.

Importing it imports every module that installs something at import (register, cli_hooks, cpu, redact: the
same set as higgs_ds/swift_plugin.py, the `swift sft` entry), so a run goes through the same hooks either way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from higgs_ds.errors import UserError
from higgs_ds.models.family import V3, environment_family, model_family
from higgs_ds.models.patches import AUDIO_FFN_LINEARS, AUDIO_NORMS, AUDIO_SIDES
from higgs_ds.train.checkpoint import is_complete, latest_complete, read_data_state
from higgs_ds.train.swift import cli_hooks, redact  # noqa: F401  installed at import: SwiftSft's hooks, redaction
from higgs_ds.train.swift.cpu import configure_cpu_ranks, configure_single_process
from higgs_ds.train.swift.pipeline import HiggsSft
from higgs_ds.train.swift.register import MODEL_TYPES, TEMPLATE_TYPE, HiggsAudioLoader
from higgs_ds.train.swift.template import HiggsAudioTemplate
from higgs_ds.train.swift.trainer import HiggsAudioTrainer

log = logging.getLogger(__name__)


def _dtype(cfg) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def _tuner_args(cfg, family: str) -> dict:
    """SWIFT's tuner arguments for cfg.tuner and cfg.train_modules (see TrainConfig.train_modules)."""
    audio = AUDIO_SIDES[family]
    if family == V3:
        return _v3_tuner_args(cfg, audio)
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


def _v3_tuner_args(cfg, audio) -> dict:
    """Higgs TTS 3: LoRA adapters on every backbone projection (SWIFT's all-linear: the model has no other
    nn.Linear) with the fused codebook table, its audio input embedding and tied head, trained in full as ONE
    module (modules_to_save copies it once, so the tie holds); train_modules "audio" trains that table alone."""
    if cfg.tuner == "lora" and cfg.train_modules == "audio":
        raise UserError(
            'train_modules = "audio" with LoRA: Higgs TTS 3 has no audio-only layers to put adapters on; use '
            'train_modules = "all" (adapters on the backbone, the codebook table in full) or tuner = "full"'
        )
    if cfg.tuner == "lora":
        return {
            "lora_rank": cfg.lora_rank,
            "target_modules": "all-linear",
            "modules_to_save": [*audio.head_and_embeddings],
        }
    if cfg.train_modules == "audio":
        return {"freeze_parameters_ratio": 1, "trainable_parameters_regex": audio.parameters}
    return {}


def _resume_checkpoint(cfg) -> Path | None:
    """The checkpoint this run resumes from, chosen as HiggsSft chooses it (resume = auto | never | PATH)."""
    if cfg.resume in ("never", ""):
        return None
    return latest_complete(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume)


def _grad_accum(cfg) -> int:
    """cfg.grad_accum; on a resume at another world size with keep_global_batch, the accumulation that keeps
    the saved run's micro-batches per step (its world size x its gradient_accumulation_steps, from the
    checkpoint's args.json: what it ran with, which may itself have been rescaled)."""
    ckpt = _resume_checkpoint(cfg) if cfg.keep_global_batch else None
    saved = read_data_state(ckpt, 0) if ckpt is not None and is_complete(ckpt) else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if saved is None or saved["world_size"] == world or not (ckpt / "args.json").is_file():
        return cfg.grad_accum
    ran = json.loads((ckpt / "args.json").read_text()).get("gradient_accumulation_steps")
    if not isinstance(ran, int) or ran < 1:
        return cfg.grad_accum
    per_step = saved["world_size"] * ran
    if per_step % world:
        log.warning(
            f"{ckpt} took {per_step} micro-batches per optimizer step ({saved['world_size']} ranks x {ran}); "
            f"{world} ranks cannot divide them: grad_accum stays {cfg.grad_accum}, so the global batch changes "
            f"(resume on a number of ranks that divides {per_step} to keep it)"
        )
        return cfg.grad_accum
    if int(os.environ.get("RANK", "0")) == 0:
        log.warning(
            f"resuming {ckpt} ({saved['world_size']} ranks x grad_accum {ran}) on {world} ranks: grad_accum "
            f"{per_step // world}, the same {per_step} micro-batches per optimizer step (keep_global_batch)"
        )
    return per_step // world


def _family(cfg) -> str:
    # the model directory's family (a missing or foreign one is refused by HiggsAudioLoader, with the reason)
    return model_family(cfg.model) if Path(cfg.model, "config.json").is_file() else environment_family()


def swift_argv(cfg) -> list[str]:
    dtype = _dtype(cfg)
    family = _family(cfg)
    args = {
        "model": cfg.model,
        "model_type": MODEL_TYPES[family],
        "template": TEMPLATE_TYPE,
        "tuner_type": cfg.tuner,
        "dataset": cfg.data.shards[0] if cfg.data.shards else "none",  # never loaded: HiggsSft injects the stream
        "streaming": "true",
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.data.batch_size,
        "gradient_accumulation_steps": _grad_accum(cfg),
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
        if cfg.eval.select != "loss":  # HF's best-checkpoint choice (kept by save_total_limit), by a judge
            args.update(metric_for_best_model=f"eval_{cfg.eval.select}",
                        greater_is_better=str(cfg.eval.select in ("sim", "mos")).lower())  # fmt: skip
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
    HiggsAudioTrainer.reset_optimizer = cfg.resume_reset_optimizer
    HiggsAudioTrainer.sample_log = (
        os.path.join(cfg.output_dir, "samples_rank{rank}.jsonl") if cfg.log_sample_ids else None
    )
    configure_single_process(bool(cfg.deepspeed))
    configure_cpu_ranks(bool(cfg.deepspeed))
    if int(os.environ.get("RANK", "0")) == 0 and _family(cfg) == V3:  # once per run, before anything trains
        from higgs_ds.models.v3.licence import TRAINING_TERMS

        log.warning(TRAINING_TERMS)
    if int(os.environ.get("RANK", "0")) == 0:
        # HF's trainer states the run's size on INFO, under the warning level SWIFT leaves it at; among
        # it "Number of trainable parameters = N", counted at full size under ZeRO-3 (what train_modules left).
        logging.getLogger("transformers.trainer").setLevel(logging.INFO)
    return HiggsSft(swift_argv(cfg), cfg).main()
