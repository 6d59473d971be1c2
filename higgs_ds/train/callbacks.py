"""Training callbacks (transformers only): the dense rank-0 log line, throughput metrics, stop requests.

ThroughputCallback adds, at every logging step, to the metrics SWIFT logs (TensorBoard, logging.jsonl):
tokens_per_s (expanded positions of all ranks), audio_hours_per_s (target audio of all ranks), mfu (model
FLOPs utilisation, when the device's peak is known), memory_gb (peak allocated on the GPU, or the
process's peak RSS on CPU).
"""

from __future__ import annotations

import resource
import time

import torch
from transformers import TrainerCallback

from higgs_ds.train.checkpoint import stop_requested


class StopRequestCallback(TrainerCallback):
    """Stop cleanly when a stop file appears (see higgs_ds.train.checkpoint): rank 0 looks, every rank agrees
    through one all-reduce per step, then HF saves a checkpoint and leaves the loop on every rank."""

    def __init__(self, output_dir: str):
        self.output_dir, self.stopped = output_dir, False

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(
            [float(state.is_world_process_zero and stop_requested(self.output_dir))], device=args.device
        )
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        if flag.item() > 0:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control


class DenseLogCallback(TrainerCallback):
    """One line per logging step on rank 0: step, losses, learning rate, grad norm."""

    KEYS = (
        ("loss", "loss"),
        ("text", "text_loss"),
        ("audio", "audio_loss"),
        ("lr", "learning_rate"),
        ("grad_norm", "grad_norm"),
        ("tok/s", "tokens_per_s"),
        ("audio_h/s", "audio_hours_per_s"),
        ("mfu", "mfu"),
        ("mem_GB", "memory_gb"),
    )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "audio_loss" not in logs:
            return
        parts = [f"{name} {logs[key]:.4g}" for name, key in self.KEYS if isinstance(logs.get(key), (int, float))]
        print(f"[higgs-ds] step {state.global_step}/{state.max_steps} | " + " | ".join(parts), flush=True)


# Dense bf16 peak per device, by name fragment (FLOP/s, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(model, seq_len: float) -> float:
    """Training FLOPs per expanded position: 6 x the parameters a token passes through (a DualFFN layer
    runs either the text or the audio FFN, so one of the two FFNs counts) + causal attention."""

    def numel(p):
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions leave p.numel() == 0

    total = sum(numel(p) for p in model.parameters())
    audio_ffn = sum(numel(p) for n, p in model.named_parameters() if ".audio_mlp." in n)
    cfg = getattr(model.config, "text_config", None) or model.config  # boson nests it; the native config is flat
    attention = 6 * cfg.num_hidden_layers * cfg.hidden_size * seq_len  # QK^T and AV, forward + backward, causal
    return 6 * (total - audio_ffn) + attention


class ThroughputCallback(TrainerCallback):
    def __init__(self, trainer, peak_flops: float | None):
        self.trainer, self.peak = trainer, peak_flops
        self.last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()
        self.trainer.throughput_counts = {"tokens": 0, "audio_seconds": 0.0, "sequences": 0}

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_log:
            return
        now, counts = time.perf_counter(), self.trainer.throughput_counts
        elapsed, world = max(now - self.last, 1e-9), args.world_size
        metrics = self.trainer.custom_metrics["train"]
        # per-rank rates x world: SWIFT averages custom metrics over ranks, giving the all-rank total
        tokens_per_s = counts["tokens"] / elapsed * world
        metrics["tokens_per_s"].update(torch.tensor(tokens_per_s))
        metrics["audio_hours_per_s"].update(torch.tensor(counts["audio_seconds"] / 3600 / elapsed * world))
        if self.peak and counts["sequences"]:
            seq = counts["tokens"] / counts["sequences"]
            mfu = tokens_per_s * flops_per_token(self.trainer.model, seq) / (self.peak * world)
            metrics["mfu"].update(torch.tensor(mfu))
        if torch.cuda.is_available():
            memory = torch.cuda.max_memory_allocated() / 2**30
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        metrics["memory_gb"].update(torch.tensor(memory))
        self.trainer.throughput_counts = {"tokens": 0, "audio_seconds": 0.0, "sequences": 0}
        self.last = now
