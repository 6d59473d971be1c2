"""The trainer SWIFT builds for `higgs_audio` (registered by higgs_ds.train.swift.register).

SWIFT's Seq2SeqTrainer with the shard stream's own per-rank DataLoader instead of ms-swift's rank-0
streaming dispatcher, so every rank reads its own shards and yields the same number of batches; the stream's
position is saved in every checkpoint and restored on resume. It counts each optimizer step's loss targets
over all ranks up front (the loss is a token mean over the step) and adds higgs-ds' callbacks. save_probe
writes the trained model's logits on one batch, for the export check.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from swift.trainers import Seq2SeqTrainer
from swift.utils import get_logger

from higgs_ds.eval.validation import AudioSamples
from higgs_ds.models.interface import config_family, geometry, logits_for_loss
from higgs_ds.safe_io import atomic_write_bytes
from higgs_ds.stream.loader import EpochDataLoader, ShardStream
from higgs_ds.train.callbacks import DenseLogCallback, StopRequestCallback, ThroughputCallback, device_peak_flops
from higgs_ds.train.checkpoint import CheckpointError, is_complete, read_resume_state, stop_files, write_data_state
from higgs_ds.train.loss import target_counts
from higgs_ds.train.swift.env import ENV_LOG_SAMPLE_IDS, ENV_PEAK_TFLOPS, env_number
from higgs_ds.train.swift.fresh_optimizer import reset_requested, weights_only_deepspeed_resume
from higgs_ds.train.swift.universal import (
    group_settings,
    prepare_resume_at_new_size,
    restore_group_settings,
    untie_step_counters,
)

logger = get_logger()


class HiggsAudioTrainer(Seq2SeqTrainer):
    """SWIFT's trainer with the shard stream's own per-rank DataLoader (no rank-0 dispatcher), whose
    position is saved in every checkpoint and restored on resume (no batch is replayed or skipped), and
    higgs-ds' callbacks (throughput metrics, the dense log line, stop requests)."""

    sample_log: str | None = None  # path for per-rank sample-id logs (TrainConfig.log_sample_ids)
    audio_samples: AudioSamples | None = None  # eval.generate: prompts generated at each evaluation
    peak_tflops: float = 0.0  # TrainConfig.peak_tflops; 0: $HIGGS_DS_PEAK_TFLOPS, else known GPUs
    reset_optimizer: bool = False  # TrainConfig.resume_reset_optimizer (or $HIGGS_DS_RESUME_RESET_OPTIMIZER=1)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            # HF takes every forward argument named *label* as a label key (the native class: labels and
            # audio_labels) and computes no evaluation loss when one is missing; our batches carry `labels`.
            self.label_names = ["labels"]
        # Added here, not by the pipeline, so that `higgs-ds train` and `swift sft` get the same set;
        # each only once, whoever else (e.g. SWIFT's --callbacks) may have added one.
        peak = (self.peak_tflops or env_number(ENV_PEAK_TFLOPS, float) or 0.0) * 1e12 or device_peak_flops()
        for callback in (ThroughputCallback(self, peak), DenseLogCallback(), StopRequestCallback(self.args.output_dir)):
            if not any(isinstance(cb, type(callback)) for cb in self.callback_handler.callbacks):
                self.add_callback(callback)
        self.stop_callback = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, StopRequestCallback))
        if self.sample_log is None and os.environ.get(ENV_LOG_SAMPLE_IDS, "") == "1":
            self.sample_log = os.path.join(self.args.output_dir, "samples_rank{rank}.jsonl")
        self.reset_optimizer = reset_requested(self.reset_optimizer)
        self._voice_history = []  # evaluations with judged metrics, for warn_if_worse
        if getattr(self.args, "resume_only_model", False) and isinstance(self.train_dataset, ShardStream):
            # ms-swift's resume_only_model drops the checkpoint's data position: the epoch would start again
            raise CheckpointError(
                "--resume_only_model would restart the shard stream at the epoch's first sample (ms-swift skips "
                "the saved data position): set resume_reset_optimizer = true (or "
                "HIGGS_DS_RESUME_RESET_OPTIMIZER=1 with swift sft) to keep the weights, schedule and data "
                "position with a fresh optimizer"
            )

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
        if self.audio_samples is not None:  # every rank generates (ZeRO-3 lockstep); rank 0 writes and judges
            writer = next((cb.tb_writer for cb in self.callback_handler.callbacks if hasattr(cb, "tb_writer")), None)
            was_training = self.model.training
            self.audio_samples.run(
                self.model,
                self.template.tokenizer,
                self.state.global_step,
                writer=writer,
                is_main=self.args.process_index == 0,
                device=self.args.device,
            )
            self.model.train(was_training)
            voice = self._from_rank0(self.audio_samples.last_metrics)
            if voice:  # logged (TensorBoard, logging.jsonl) and seen by the best-checkpoint choice on every rank
                self.log(voice)
                metrics.update(voice)
                self._voice_history.append(metrics)
                warn_if_worse(self._voice_history, self.audio_samples.cfg.worse_warning)
        return metrics

    def _from_rank0(self, metrics: dict) -> dict:
        if not (torch.distributed.is_initialized() and self.args.world_size > 1):
            return dict(metrics)
        box = [dict(metrics)]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

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
        # saved on another number of ranks: DeepSpeed's universal checkpoint (the data position is global);
        # with resume_reset_optimizer only the weights are read, at any number of ranks
        self._reset = isinstance(resume, str) and self.reset_optimizer
        self._new_size = isinstance(resume, str) and not self._reset and prepare_resume_at_new_size(self, resume)
        if self._reset:
            logger.info(f"resume_reset_optimizer: resuming from the weights of {resume} with a fresh optimizer")
        stop_file = Path(self.args.output_dir) / "STOP"
        if self.args.process_index == 0 and stop_file.exists():
            stop_file.unlink()
            logger.info(f"removed a stop request left by an earlier run: {stop_file}")
        weights_only = self._reset and self.is_deepspeed_enabled
        with weights_only_deepspeed_resume(self) if weights_only else contextlib.nullcontext():
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

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._group_settings = group_settings(optimizer)  # restored after a universal load (see universal.py)
        return optimizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and getattr(self, "_reset", False) and not self.is_deepspeed_enabled:
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))
            return  # the schedule continues; optimizer.pt is not read (resume_reset_optimizer)
        super()._load_optimizer_and_scheduler(checkpoint)  # with DeepSpeed: loaded already, by the engine
        if checkpoint is not None and getattr(self, "_new_size", False) and self.is_deepspeed_enabled:
            changed = restore_group_settings(self.optimizer, self._group_settings)
            if changed:
                logger.info(f"optimizer group settings restored after the universal load: {'; '.join(changed)}")
            shared = untie_step_counters(self.optimizer)
            if shared:
                logger.info(f"{shared + 1} Adam states shared one step counter after the universal load: untied")

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
        state = read_resume_state(checkpoint, self.args.process_index, self.args.world_size)
        if state is None:
            raise CheckpointError(
                f"{checkpoint} holds no data position for rank {self.args.process_index}: it was not "
                "written by higgs-ds training, so the run cannot continue with the next sample"
            )
        self._higgs_loader.load_state_dict(state)
        chain = ", then ".join(f"{b} on {w} ranks" for w, b in state.get("segments") or [])
        logger.info(
            f"data position restored: epoch {state['epoch']}, {state['batches_done']} batches done"
            + (f" (batches per rank: {chain})" if chain else "")
        )

    def training_step(self, model, inputs, *args, **kwargs):
        if self.sample_log:
            with open(self.sample_log.format(rank=self.args.process_index), "a") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "ids": inputs.get("sample_ids")}) + "\n")
        return super().training_step(model, inputs, *args, **kwargs)


LOWER_IS_BETTER = ("eval_wer", "eval_cer")
HIGHER_IS_BETTER = ("eval_sim", "eval_mos")


def warn_if_worse(history: list[dict], evaluations: int) -> list[str]:
    """The failure the loss hides: a judged metric worse at each of the last `evaluations` evaluations
    while eval_loss got better each time (quality falling as training goes on); the warnings logged."""
    if not evaluations or len(history) <= evaluations:
        return []
    last = history[-(evaluations + 1) :]
    pairs = list(zip(last, last[1:]))
    if not all(b["eval_loss"] < a["eval_loss"] for a, b in pairs):
        return []
    warned = []
    for key in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER):
        if all(key in h for h in last):
            sign = 1 if key in LOWER_IS_BETTER else -1
            if all(sign * (b[key] - a[key]) > 0 for a, b in pairs):
                warned.append(
                    f"{key} got worse at each of the last {evaluations} evaluations ({last[0][key]:.4g} -> "
                    f"{last[-1][key]:.4g}) while eval_loss improved ({last[0]['eval_loss']:.4g} -> "
                    f"{last[-1]['eval_loss']:.4g}): listen to output_dir/eval_audio/; an earlier checkpoint "
                    "may be better"
                )
                logger.warning(warned[-1])
    return warned


def save_probe(trainer, cfg) -> None:
    """Logits of the trained model (the live DeepSpeed engine) on one fixed batch, for export checks.
    Every rank runs the forward (ZeRO-3 gathers parameters collectively); rank 0 writes the file."""
    family = config_family(trainer.model.config)
    stream = ShardStream(cfg.data, trainer.template.tokenizer, rank=0, world_size=1, family=family)
    batch = trainer.data_collator(next(iter(stream)))  # the first micro-batch of epoch 0 seen by one rank
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    model.eval()
    device = next(trainer.model.parameters()).device
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
