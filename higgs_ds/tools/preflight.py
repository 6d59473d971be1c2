"""`higgs-ds preflight CONFIG --nodes N --gpus-per-node G`: check a run before anything is allocated.

    higgs-ds preflight my_run.toml --nodes 4 --gpus-per-node 8 [--gpu-memory-gb 80] [--hashes] [--key value ...]

Two kinds of problem, with the exit codes of higgs_ds.errors:
- a user error (exit 2): the config, the model config, the DeepSpeed config or the shards are wrong (missing or
  changed shards, a codec the model cannot read, a plan that cannot be made, an output directory that cannot be
  written);
- a failed check (exit 1): the run is well formed but does not fit: fewer micro-batches than dataloader workers,
  not enough disk for the checkpoints it keeps, model states over the GPU memory.
On success it prints the plan (micro-batches per rank per epoch, samples and tokens per optimizer step, samples
repeated or dropped, the disk and memory estimates and what they assumed) and exits 0.

The estimates follow what the run holds and writes. Memory: the model states per GPU as DeepSpeed's own
estimators count them (a test checks them against estimate_zero3/zero2_model_states_mem_needs), for the ZeRO
stage, offload settings, compute dtype and trainable parameters (LoRA: adapters and modules_to_save), against
the memory of the GPUs present (or --gpu-memory-gb; without either, an assumed 80 GB, said in the output).
Disk: one checkpoint is the saved weights (LoRA: the adapters and modules_to_save only), DeepSpeed's module
states (ZeRO 0-2) and the optimizer partitions (fp32 master weights and Adam's two moments of the trainable
parameters); the run keeps every checkpoint, or [swift] save_total_limit of them plus the one being written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from higgs_ds.errors import CheckFailed, UserError
from higgs_ds.models.family import V3
from higgs_ds.models.interface import geometry
from higgs_ds.shards.codec import sha256_file
from higgs_ds.shards.format import shard_file_problem
from higgs_ds.stream.plan import EpochLayout
from higgs_ds.stream.reader import codec_mismatches, load_index, shard_refs

# Fraction of a GPU the model states may take: the rest is for activations, buffers and fragmentation.
MODEL_STATES_SHARE = 0.8
# Assumed GPU memory when none is given and no GPU is present (an 80 GB A100/H100).
ASSUMED_GPU_MEMORY_GB = 80.0
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Adam's fp32 state per trainable parameter, as DeepSpeed keeps (and saves) it: master weight + two moments.
OPTIMIZER_STATE_BYTES = 12
# DeepSpeed's estimators: per trainable parameter, besides its compute-dtype copy, 16 bytes of fp32 state
# (master weight, the two moments, the fp32 gradient); ZeRO 0-2 add the compute-dtype gradient.
FP32_STATE_BYTES = 16


@dataclass
class Report:
    user_errors: list[str] = field(default_factory=list)
    check_failures: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return self.user_errors + self.check_failures

    def fail(self, message: str) -> None:
        """A check of the run against the resources found a problem (exit 1)."""
        self.check_failures.append(message)

    def wrong(self, message: str) -> None:
        """The run's inputs are wrong (exit 2)."""
        self.user_errors.append(message)


@dataclass(frozen=True)
class ModelSizes:
    parameters: int
    trainable: int
    largest_layer: int
    """Parameters of the biggest module (its own, not its children's): what ZeRO-3 gathers at once."""


@dataclass(frozen=True)
class ZeroSettings:
    deepspeed: bool = False
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    hpz_partition_size: int = 1
    gather_16bit_weights_on_save: bool = False


def model_sizes(model_dir: str, tuner: str = "full", train_modules: str = "all", lora_rank: int = 8) -> ModelSizes:
    """Sizes of the model, built on the meta device (no memory, no weights): full fine-tuning trains all or the
    audio side; LoRA trains rank x (in + out) per adapted linear layer (every linear layer but the two heads, or
    the audio FFN's) plus, for "audio", the modules it saves."""
    import torch

    from higgs_ds.models.family import require_model_family
    from higgs_ds.models.patches import AUDIO_FFN_LINEARS, is_audio_parameter

    family = require_model_family(model_dir)
    try:
        with torch.device("meta"):
            model = _model_on_meta(model_dir, family)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(
            f"{model_dir}/config.json does not describe a Higgs-Audio model ({err}): point `model` at a "
            "Higgs-Audio v2 model directory"
        ) from err
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    if tuner == "full":
        audio = sum(p.numel() for n, p in named.items() if is_audio_parameter(n, family))
        trainable = total if train_modules == "all" else audio
        return ModelSizes(total, trainable, largest)
    adapted = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and (re.fullmatch(AUDIO_FFN_LINEARS, name) if train_modules == "audio" else not name.endswith("lm_head"))
    ]
    lora = sum(lora_rank * (m.in_features + m.out_features) for m in adapted)
    saved = (
        sum(p.numel() for n, p in named.items() if is_audio_parameter(n, family) and ".audio_mlp." not in n)
        if train_modules == "audio"
        else 0
    )
    if family == V3:  # LoRA trains Higgs TTS 3's fused codebook table in full beside the adapters
        saved = sum(p.numel() for n, p in named.items() if is_audio_parameter(n, family))
    return ModelSizes(total, lora + saved, largest)


def count_parameters(model_dir: str, tuner: str = "full", train_modules: str = "all", lora_rank: int = 8):
    """(all parameters, trainable ones) of the model: see model_sizes."""
    sizes = model_sizes(model_dir, tuner, train_modules, lora_rank)
    return sizes.parameters, sizes.trainable


def zero_settings(path: str) -> ZeroSettings:
    """The ZeRO settings of a DeepSpeed config file ("" for none); UserError naming the file and key."""
    if not path:
        return ZeroSettings()
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"DeepSpeed config {path} cannot be read ({err}): fix the file or the `deepspeed` setting")
    zero = ds.get("zero_optimization", {}) if isinstance(ds, dict) else None
    if not isinstance(zero, dict):
        raise UserError(f"DeepSpeed config {path}: zero_optimization must be an object: fix the file")
    stage = zero.get("stage", 0)
    if type(stage) is not int or not 0 <= stage <= 3:
        raise UserError(f"DeepSpeed config {path}: zero_optimization.stage is {stage!r}, not 0-3: fix the file")
    hpz = zero.get("zero_hpz_partition_size", 1)
    if type(hpz) is not int or hpz < 1:
        raise UserError(f"DeepSpeed config {path}: zero_hpz_partition_size is {hpz!r}, not >= 1: fix the file")

    def offloaded(key: str) -> bool:
        section = zero.get(key, {})
        if not isinstance(section, dict):
            raise UserError(f"DeepSpeed config {path}: zero_optimization.{key} must be an object: fix the file")
        device = section.get("device", "none")
        if device not in ("none", "cpu", "nvme", None):
            raise UserError(f"DeepSpeed config {path}: {key}.device is {device!r}, not none/cpu/nvme: fix the file")
        return device in ("cpu", "nvme")

    return ZeroSettings(
        deepspeed=True,
        stage=stage,
        offload_optimizer=offloaded("offload_optimizer"),
        offload_param=offloaded("offload_param"),
        hpz_partition_size=hpz,
        gather_16bit_weights_on_save=bool(zero.get("stage3_gather_16bit_weights_on_model_save", False)),
    )


def model_states_bytes(sizes: ModelSizes, zero: ZeroSettings, world: int, per_node: int, dtype_bytes: int = 2) -> float:
    """Per-GPU bytes of weights, gradients and optimizer states (no activations), counted as DeepSpeed's
    estimators count them, with frozen parameters holding only their weights."""
    w, params, trainable = dtype_bytes, sizes.parameters, sizes.trainable
    fp32_states = 0 if zero.offload_optimizer else FP32_STATE_BYTES * trainable  # offloaded with the gradients
    if zero.stage >= 3:
        weights = 0 if zero.offload_param else w * params / world
        if zero.hpz_partition_size > 1 and not zero.offload_param:  # ZeRO++: a secondary copy within the group
            weights += w * params / zero.hpz_partition_size
        return 2 * w * sizes.largest_layer + weights + fp32_states / world
    grads = 0 if zero.offload_optimizer else w * trainable
    if zero.stage == 2:
        return w * params + (grads + fp32_states) / world
    if zero.stage == 1:
        return w * params + grads + fp32_states / world
    return w * params + grads + fp32_states


def checkpoint_bytes(sizes: ModelSizes, zero: ZeroSettings, tuner: str, dtype_bytes: int) -> dict:
    """Bytes one checkpoint writes, by part (all ranks together)."""
    saved = sizes.trainable if tuner == "lora" else sizes.parameters  # PEFT saves adapters + modules_to_save
    if not zero.deepspeed:  # HF Trainer: the weights and torch's AdamW moments, in the parameters' dtype
        return {"weights": dtype_bytes * saved, "optimizer": 2 * dtype_bytes * sizes.trainable}
    gathered = zero.stage < 3 or zero.gather_16bit_weights_on_save
    return {
        "weights": dtype_bytes * saved if gathered else 0,  # model.safetensors / adapter_model.safetensors
        # ZeRO 0-2 write the module's state dict again (frozen weights left out for PEFT); ZeRO-3 partitions it
        "module_states": dtype_bytes * saved if zero.stage < 3 else 0,
        "optimizer": OPTIMIZER_STATE_BYTES * sizes.trainable,
    }


def checkpoints_on_disk(max_steps: int, save_steps: int, save_total_limit) -> int:
    """How many checkpoints exist at once: every save, or save_total_limit plus the one being written (HF
    deletes the oldest only after the new one is complete)."""
    saves = max(1, math.ceil(max_steps / max(save_steps, 1)))
    if save_total_limit in (None, "", "None"):
        return saves
    try:
        limit = int(save_total_limit)
    except (TypeError, ValueError):
        raise UserError(f"[swift] save_total_limit is {save_total_limit!r}, not a whole number: fix the config")
    return saves if limit <= 0 else min(saves, limit + 1)


def gpu_memory(given_gb: float | None) -> tuple[float, str]:
    """(GB per GPU, where the figure comes from): the given size, the smallest GPU present, or the assumption."""
    if given_gb is not None:
        if not given_gb > 0:
            raise UserError(f"--gpu-memory-gb {given_gb} is not a positive size: give the GPUs' memory in GB")
        return float(given_gb), "given (--gpu-memory-gb)"
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        smallest = min(props, key=lambda p: p.total_memory)
        return smallest.total_memory / 2**30, f"measured: {smallest.name}, the smallest of {len(props)} GPU(s) here"
    return ASSUMED_GPU_MEMORY_GB, (
        f"assumed {ASSUMED_GPU_MEMORY_GB:g} GB: no GPU here; pass --gpu-memory-gb with the run's GPU memory"
    )


def _dtype_bytes(dtype: str) -> tuple[int, str]:
    if dtype == "auto":
        return DTYPE_BYTES["bfloat16"], "bfloat16 (dtype auto on GPUs; a CPU run is float32)"
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype is {dtype!r}: use auto, bfloat16 or float32")
    return DTYPE_BYTES[dtype], dtype


def _model_on_meta(model_dir: str, family: str):
    if family == V3:
        from higgs_ds.models.v3.checkpoint import load_v3_config
        from higgs_ds.models.v3.modeling import HiggsTTS3ForConditionalGeneration

        return HiggsTTS3ForConditionalGeneration(load_v3_config(model_dir))
    if family == "native":
        from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

        return HiggsAudioV2ForConditionalGeneration(HiggsAudioV2Config.from_pretrained(model_dir), use_text_head=True)
    import boson_multimodal.model.higgs_audio  # noqa: F401
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

    return HiggsAudioModel(HiggsAudioConfig.from_pretrained(model_dir))


def _check_shards(cfg, model_config, hashes: bool, report: Report) -> None:
    for d in cfg.data.shards:
        try:
            index = load_index(d, check_files=False)
        except UserError as err:
            report.wrong(str(err))
            continue
        for shard in index["shards"]:  # load_index has checked every name is a bare file name inside d
            path = Path(d) / shard["file"]
            problem = shard_file_problem(d, shard)  # nothing is opened: a fifo or /dev/zero never is
            if problem:
                report.wrong(f"shard {path} {problem}")
            elif hashes and sha256_file(path) != shard["sha256"]:
                report.wrong(
                    f"shard {path} differs from its index.json (sha256): it was changed after the build; "
                    "`higgs-ds shards verify` names every bad shard, then rebuild it"
                )
        report.user_errors.extend(codec_mismatches(index, geometry(model_config), d))


def _check_output_dir(cfg, need_bytes: float, report: Report) -> None:
    out = Path(cfg.output_dir).absolute()
    probe = next(p for p in (out, *out.parents) if p.exists())
    if not probe.is_dir():
        report.wrong(f"output_dir {out}: {probe} is not a directory: choose another output_dir")
        return
    try:  # a file of our own making (never one of the user's that happens to share a name)
        fd, test = tempfile.mkstemp(prefix=".higgs-ds-preflight-", dir=probe)
        os.close(fd)
        os.unlink(test)
    except OSError as err:
        report.wrong(f"output directory {probe} is not writable ({err.strerror}): choose another output_dir")
        return
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        report.fail(
            f"{probe} has {free / 2**30:.1f} GB free; the checkpoints this run keeps need about "
            f"{need_bytes / 2**30:.1f} GB: free space, choose another output_dir, or keep fewer checkpoints "
            "([swift] save_total_limit = 2, or a larger save_steps)"
        )


def preflight(cfg, nodes: int, gpus_per_node: int, gpu_memory_gb: float | None = None, hashes: bool = False) -> Report:
    """Check `cfg` for a run on nodes x gpus_per_node processes; the problems and the plan are in the Report."""
    report = Report()
    if nodes < 1 or gpus_per_node < 1:
        report.wrong(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be at least 1")
        return report
    world = nodes * gpus_per_node
    from transformers import AutoConfig

    from higgs_ds.models.family import register_auto_classes, require_model_family

    family = require_model_family(cfg.model)
    register_auto_classes()  # boson's "higgs_audio" or our Higgs TTS 3 config: no remote code
    try:
        model_config = AutoConfig.from_pretrained(cfg.model)  # no trust_remote_code: never runs a model's code
    except (OSError, ValueError) as err:
        raise UserError(f"{cfg.model}/config.json cannot be read ({err}): point `model` at a model directory") from err
    _check_shards(cfg, model_config, hashes, report)
    if report.problems:
        return report

    refs = shard_refs(cfg.data.shards, lengths_for=V3) if family == V3 else shard_refs(cfg.data.shards)
    try:
        if family == V3:  # what the v3 stream refuses before its first batch (samples v3 cannot train, lengths)
            from transformers import AutoTokenizer

            from higgs_ds.stream.loader import check_v3_shards
            from higgs_ds.stream.tokens import tokenizer_fingerprint

            fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(cfg.model))
            check_v3_shards(cfg.data, [load_index(d, check_files=False) for d in cfg.data.shards], fingerprint)
        # the all-ranks part once (equal batch counts, repeats), then rank 0's batches: O(samples + ranks)
        layout = EpochLayout(refs, cfg.data.batching(), seed=cfg.data.seed, epoch=0, world_size=world)
        first = layout.rank_plan(0)
    except UserError as err:
        report.wrong(str(err))
        return report
    batches = len(first.batches)
    workers = max(cfg.data.num_workers, 1)
    if batches < workers:
        report.fail(
            f"each of the {world} ranks gets {batches} micro-batches per epoch, fewer than its "
            f"{cfg.data.num_workers} dataloader workers: lower data.num_workers, or rebuild the shards "
            f"with more samples or a smaller batch"
        )

    sizes = model_sizes(cfg.model, cfg.tuner, cfg.train_modules, cfg.lora_rank)
    zero = zero_settings(cfg.deepspeed)
    dtype_bytes, dtype_used = _dtype_bytes(cfg.dtype)
    parts = checkpoint_bytes(sizes, zero, cfg.tuner, dtype_bytes)
    kept = checkpoints_on_disk(cfg.max_steps, cfg.save_steps, cfg.swift.get("save_total_limit"))
    _check_output_dir(cfg, kept * sum(parts.values()), report)

    memory_gb, memory_source = gpu_memory(gpu_memory_gb)
    per_gpu = model_states_bytes(sizes, zero, world, gpus_per_node, dtype_bytes) / 2**30
    if per_gpu > MODEL_STATES_SHARE * memory_gb:
        report.fail(
            f"model states need about {per_gpu:.1f} GB per GPU with ZeRO stage {zero.stage} on {world} GPUs, "
            f"over {MODEL_STATES_SHARE:.0%} of {memory_gb:g} GB ({memory_source}): use ds_configs/zero3.json, "
            'more GPUs, ds_configs/zero3_offload.json, or tuner = "lora"'
        )
    report.plan = _plan(cfg, refs, layout, first, world, sizes, zero, parts, kept, per_gpu, memory_gb, memory_source)
    report.plan["dtype_assumed"] = dtype_used
    return report


def _plan(cfg, refs, layout, first, world, sizes, zero, parts, kept, per_gpu, memory_gb, memory_source) -> dict:
    lengths = [r.lengths for r in refs if r.lengths is not None]  # int32 arrays (reader.shard_refs)
    counted = sum(len(n) for n in lengths)
    mean_len = sum(int(n.sum(dtype="int64")) for n in lengths) / counted if counted else None
    per_step = first.batches.sizes().tolist()
    batches = len(first.batches)
    samples_per_step = sum(per_step) / len(per_step) * world * cfg.grad_accum
    one_checkpoint = sum(parts.values())
    return {
        "ranks": world,
        "samples": sum(r.num_samples for r in refs),
        "micro_batches_per_rank_per_epoch": batches,
        "optimizer_steps_per_epoch": -(-batches // cfg.grad_accum),
        "samples_per_optimizer_step": round(samples_per_step, 1),
        "expanded_positions_per_optimizer_step": round(samples_per_step * mean_len) if mean_len else None,
        "samples_repeated_per_epoch": layout.total_repeated(),
        "samples_dropped_per_epoch": first.num_dropped,
        "parameters": sizes.parameters,
        "trainable_parameters": sizes.trainable,
        "zero_stage": zero.stage if zero.deepspeed else None,
        "model_states_gb_per_gpu": round(per_gpu, 2),
        "gpu_memory_gb": round(memory_gb, 2),
        "gpu_memory_source": memory_source,
        "checkpoint_gb": round(one_checkpoint / 2**30, 3),
        "checkpoint_parts_gb": {k: round(v / 2**30, 3) for k, v in parts.items()},
        "checkpoints_kept": kept,
        "disk_gb_needed": round(kept * one_checkpoint / 2**30, 2),
    }


def run(
    config_path: str | None,
    overrides: list[str],
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gb: float | None = None,
    hashes: bool = False,
) -> int:
    """The `higgs-ds preflight` command: prints the plan and returns 0, or raises UserError (exit 2) for
    wrong inputs and CheckFailed (exit 1) for a run that does not fit, naming every problem on one line."""
    from higgs_ds.train.run import resolve_config

    cfg = resolve_config(config_path, overrides)  # ConfigError is a UserError
    report = preflight(cfg, nodes, gpus_per_node, gpu_memory_gb, hashes)
    if report.user_errors:
        raise UserError(_one_line(report.problems))
    print(json.dumps(report.plan, indent=1))
    if report.check_failures:
        raise CheckFailed("preflight: " + _one_line(report.check_failures))
    print("preflight: OK")
    return 0


def _one_line(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
