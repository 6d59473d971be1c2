"""`higgs-ds preflight CONFIG --nodes N --gpus-per-node G`: check a run before anything is allocated.

Checks, each failing with what to do: the shards exist and match their index (sizes always, sha256 with
--hashes); there are enough samples and micro-batches for every rank and dataloader worker; the shards'
codec matches the model config; the output directory is writable and has room for checkpoints; the
DeepSpeed config parses, and the model states fit the GPU memory given. Then it prints the plan: micro-
batches per rank per epoch, samples and tokens per optimizer step, samples repeated or dropped.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from higgs_ds.codec import sha256_file
from higgs_ds.config import ConfigError
from higgs_ds.epoch_plan import PlanError, plan_epoch
from higgs_ds.shard_reader import ShardError, codec_mismatches, load_index, shard_refs

# Bytes of model states per parameter with mixed-precision Adam: 2 (bf16 weights) + 2 (bf16 grads)
# + 12 (fp32 master weights, momentum, variance).
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)

    def fail(self, message: str) -> None:
        self.problems.append(message)


def count_parameters(model_dir: str, tuner: str = "full", train_modules: str = "all", lora_rank: int = 8):
    """(all parameters, trainable ones) of the model, built on the meta device (no memory, no weights):
    full fine-tuning trains all or the audio side; LoRA trains rank x (in + out) per adapted linear layer
    (every linear layer but the two heads, or the audio FFN's) plus, for "audio", the modules it saves."""
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

    from higgs_ds.model_patches import AUDIO_FFN_LINEARS, is_audio_parameter

    with torch.device("meta"):
        model = HiggsAudioModel(HiggsAudioConfig.from_pretrained(model_dir))
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    if tuner == "full":
        return total, total if train_modules == "all" else sum(
            p.numel() for n, p in named.items() if is_audio_parameter(n)
        )
    adapted = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and (re.fullmatch(AUDIO_FFN_LINEARS, name) if train_modules == "audio" else not name.endswith("lm_head"))
    ]
    lora = sum(lora_rank * (m.in_features + m.out_features) for m in adapted)
    saved = (
        sum(p.numel() for n, p in named.items() if is_audio_parameter(n) and ".audio_mlp." not in n)
        if train_modules == "audio"
        else 0
    )
    return total, lora + saved


def model_states_gb(params: int, trainable: int, zero: dict, world: int, per_node: int) -> float:
    """Per-GPU model-state memory (no activations) for a ZeRO stage and offload setting."""
    stage = zero.get("stage", 0)
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    offload_param = zero.get("offload_param", {}).get("device", "none") != "none"
    opt = 0 if offload_opt else OPTIMIZER_BYTES * trainable
    weights, grads = WEIGHT_BYTES * params, GRAD_BYTES * trainable
    hpz = zero.get("zero_hpz_partition_size", 1)
    if stage >= 3:
        shard = per_node if hpz > 1 else world
        total = (0 if offload_param else weights / shard) + grads / world + opt / world
    elif stage == 2:
        total = weights + grads / world + opt / world
    elif stage == 1:
        total = weights + grads + opt / world
    else:
        total = weights + grads + opt
    return total / 2**30


def preflight(cfg, nodes: int, gpus_per_node: int, gpu_memory_gb: float = 80.0, hashes: bool = False) -> Report:
    report = Report()
    world = nodes * gpus_per_node
    import boson_multimodal.model.higgs_audio  # noqa: F401
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model)
    for d in cfg.data.shards:
        try:
            index = load_index(d, check_files=False)
        except ShardError as err:
            report.fail(str(err))
            continue
        for shard in index["shards"]:
            path = Path(d) / shard["file"]
            if not path.is_file():
                report.fail(
                    f"shard {path} is listed in its index.json but missing: rebuild it "
                    "(`higgs-ds shards build ... --resume`) or restore the file"
                )
            elif path.stat().st_size != shard["bytes"] or (hashes and sha256_file(path) != shard["sha256"]):
                report.fail(
                    f"shard {path} differs from its index.json ({'sha256' if hashes else 'size'}): it was "
                    "changed or cut short after the build; `higgs-ds shards verify` names every bad shard, "
                    "then rebuild it"
                )
        for problem in codec_mismatches(index, model_config, d):
            report.fail(problem)
    if report.problems:
        return report

    refs = shard_refs(cfg.data.shards)
    try:
        plans = [
            plan_epoch(refs, cfg.data.batching(), seed=cfg.data.seed, epoch=0, rank=r, world_size=world)
            for r in range(world)
        ]
    except PlanError as err:
        report.fail(str(err))
        return report
    batches = len(plans[0].batches)
    workers = max(cfg.data.num_workers, 1)
    if batches < workers:
        report.fail(
            f"each of the {world} ranks gets {batches} micro-batches per epoch, fewer than its "
            f"{cfg.data.num_workers} dataloader workers: lower data.num_workers, or rebuild the shards "
            f"with more samples or a smaller batch"
        )
    num_samples = sum(r.num_samples for r in refs)

    out = Path(cfg.output_dir)
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    params, trainable = count_parameters(cfg.model, cfg.tuner, cfg.train_modules, cfg.lora_rank)
    checkpoint_gb = params * (WEIGHT_BYTES + OPTIMIZER_BYTES + 4) / 2**30
    if not shutil.disk_usage(probe).free > 2 * checkpoint_gb * 2**30:
        report.fail(
            f"{probe} has {shutil.disk_usage(probe).free / 2**30:.1f} GB free; two checkpoints of this "
            f"model need about {2 * checkpoint_gb:.1f} GB: free space or choose another output_dir"
        )
    try:
        test = probe / ".higgs-ds-preflight"
        test.write_text("ok")
        test.unlink()
    except OSError as err:
        report.fail(f"output directory {probe} is not writable ({err.strerror}): choose another output_dir")

    zero = {}
    if cfg.deepspeed:
        try:
            zero = json.loads(Path(cfg.deepspeed).read_text()).get("zero_optimization", {})
        except (OSError, json.JSONDecodeError) as err:
            report.fail(f"DeepSpeed config {cfg.deepspeed} cannot be read: {err}")
    per_gpu = model_states_gb(params, trainable, zero, world, gpus_per_node)
    if per_gpu > 0.8 * gpu_memory_gb:
        report.fail(
            f"model states need about {per_gpu:.1f} GB per GPU with ZeRO stage {zero.get('stage', 0)} on "
            f"{world} GPUs, over 80% of {gpu_memory_gb:g} GB: use ds_configs/zero3.json, more GPUs, or "
            "ds_configs/zero3_offload.json"
        )
    lengths = [n for r in refs for n in (r.lengths or ())]
    mean_len = sum(lengths) / len(lengths) if lengths else None
    per_step = [len(b) for b in plans[0].batches]
    report.plan = {
        "ranks": world,
        "samples": num_samples,
        "micro_batches_per_rank_per_epoch": batches,
        "optimizer_steps_per_epoch": -(-batches // cfg.grad_accum),
        "samples_per_optimizer_step": round(sum(per_step) / len(per_step) * world * cfg.grad_accum, 1),
        "expanded_positions_per_optimizer_step": round(
            sum(per_step) / len(per_step) * world * cfg.grad_accum * mean_len
        )
        if mean_len
        else None,
        "samples_repeated_per_epoch": sum(p.num_repeated for p in plans),
        "samples_dropped_per_epoch": plans[0].num_dropped,
        "parameters": params,
        "trainable_parameters": trainable,
        "model_states_gb_per_gpu": round(per_gpu, 2),
        "zero_stage": zero.get("stage", 0),
        "checkpoint_gb": round(checkpoint_gb, 2),
    }
    return report


def run(
    config_path: str | None, overrides: list[str], nodes: int, gpus_per_node: int, gpu_memory_gb: float, hashes: bool
) -> int:
    from higgs_ds.train import resolve_config

    try:
        cfg = resolve_config(config_path, overrides)
    except ConfigError as err:
        print(f"preflight: FAIL: {err}")
        return 1
    report = preflight(cfg, nodes, gpus_per_node, gpu_memory_gb, hashes)
    for problem in report.problems:
        print(f"preflight: FAIL: {problem}")
    if report.problems:
        return 1
    print(json.dumps(report.plan, indent=1))
    print("preflight: OK")
    return 0
