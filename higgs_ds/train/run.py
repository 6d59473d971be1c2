"""`higgs-ds train CONFIG [--key value ...]`: one training run, under torchrun (one process per device),
or started directly as a single process (a laptop, one GPU; with or without a DeepSpeed config).

    torchrun --nproc_per_node 2 -m higgs_ds.train.run configs/demo.toml --max_steps 40
    higgs-ds train configs/demo.toml --max_steps 40          # one process

The config chooses the model directory, the shard directories, the DeepSpeed config, the optimisation
settings and the output directory; any ms-swift training argument not covered here goes in [swift].
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from higgs_ds.errors import EXIT_CODES_HELP, UserError, report
from higgs_ds.eval.validation import EvalConfig
from higgs_ds.models.trust import check_model_dir
from higgs_ds.safe_io import atomic_write_json, redact
from higgs_ds.stream.loader import DataConfig
from higgs_ds.train.config import ConfigError, describe, load_config, to_dict
from higgs_ds.train.loss import LossConfig


@dataclass(frozen=True)
class TrainConfig:
    model: str = ""
    """Model directory loaded with from_pretrained (the released checkpoint, or `higgs-ds tiny-model DIR`)."""
    output_dir: str = "runs/train"
    """Checkpoints, TensorBoard logs (output_dir/logs) and logging.jsonl go here."""
    deepspeed: str = "ds_configs/zero3.json"
    """DeepSpeed config file ("" for none)."""
    tuner: str = "full"
    """full: train the weights themselves; lora: LoRA adapters, rank lora_rank (ms-swift's tuner_type)."""
    train_modules: str = "all"
    """Which part of the model trains. all: everything (lora: adapters on every linear layer but the heads).
    audio: only the audio side, the rest frozen: each layer's audio FFN (audio_mlp) and audio norms
    (audio_input_layernorm, audio_post_attention_layernorm), the audio head (audio_decoder_proj.audio_lm_head)
    and the codebook embeddings (audio_codebook_embeddings); attention, text FFNs and norms, embed_tokens,
    text_lm_head and the final norm keep their weights. With lora, adapters go on the audio FFN projections
    only and the audio head, embeddings and norms train in full (saved with the adapters)."""
    lora_rank: int = 8
    """LoRA rank (tuner = "lora")."""
    max_steps: int = 1000
    """Optimizer steps to run."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up (any transformers scheduler name)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16 or float32."""
    save_steps: int = 500
    """Save a checkpoint every this many steps."""
    logging_steps: int = 10
    """Log every this many steps."""
    seed: int = 42
    """Seed of model-side randomness (the data order has its own, data.seed)."""
    ddp_timeout: int = 1800
    """Seconds a collective may wait before the job fails (ms-swift's default is 208 days)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir if there is one; never; or a
    checkpoint path. Model, optimizer, scheduler, RNG and the data position are restored."""
    keep_global_batch: bool = True
    """On a resume at another number of ranks, rescale grad_accum so that an optimizer step still takes as
    many micro-batches as the run that saved the checkpoint (the same global batch: the loss and the
    learning-rate schedule keep their meaning); a warning when it cannot be divided. false: grad_accum as given."""
    resume_reset_optimizer: bool = False
    """Resume from the checkpoint's weights, learning-rate schedule, step and data position with a fresh
    optimizer (Adam's moments at zero), at any number of ranks. For a checkpoint DeepSpeed cannot convert
    to another world size, or new optimizer settings; never chosen without this setting."""
    log_sample_ids: bool = False
    """Append every micro-batch's sample ids to output_dir/samples_rank{R}.jsonl (audits, tests)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: far less activation memory, ~30% more compute."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for the mfu metric (0: known GPUs are looked up; none on CPU)."""
    save_probe: bool = False
    """After training, save the model's logits on one fixed batch to output_dir/probe.pt (export checks)."""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    swift: dict = field(default_factory=dict)
    """Any other ms-swift / transformers training argument, passed through as --key value."""


HELP = f"""usage: higgs-ds train CONFIG.toml|CONFIG.yaml [--key value ...]

Train Higgs-Audio v2 through ms-swift with DeepSpeed. Run it under torchrun (launch/torchrun.sh) for
several devices or nodes, or directly for one process. The model directory must be local and carry no code
(no Python files, no auto_map): nothing from a model directory is executed.
Settings come from the config file (TOML, or YAML when named .yaml/.yml), overridden by --key value
(nested: --data.batch_size 8).

settings:
{describe(TrainConfig)}

{EXIT_CODES_HELP}
"""


def resolve_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """Load and check a run config (also used by `higgs-ds preflight`); ConfigError says what to fix."""
    cfg = load_config(TrainConfig, path, overrides)
    if not cfg.model:
        raise ConfigError('no model directory: set `model = "..."` in the config or pass --model DIR')
    # A local directory that carries no code (ms-swift reads configs with trust_remote_code=True; the
    # plugin also makes remote code impossible in the process, see higgs_ds.models.trust).
    check_model_dir(cfg.model)
    if not cfg.data.shards:
        raise ConfigError('no shard directories: set data.shards = ["DIR", ...] or pass --data.shards')
    cfg.eval.check()
    if cfg.eval.select != "loss" and cfg.save_steps % cfg.eval.steps:
        raise ConfigError(
            f"eval.select = {cfg.eval.select!r} keeps the best checkpoint of an evaluation step: make save_steps "
            f"({cfg.save_steps}) a multiple of eval.steps ({cfg.eval.steps})"
        )
    for d in [*cfg.data.shards, *cfg.eval.shards]:
        if not Path(d, "index.json").is_file():
            raise ConfigError(f"shard directory {d} has no index.json; build it with `higgs-ds shards build`")
    if cfg.tuner not in ("full", "lora"):
        raise ConfigError(f"tuner must be 'full' or 'lora', got {cfg.tuner!r}")
    if cfg.train_modules not in ("all", "audio"):
        raise ConfigError(f"train_modules must be 'all' or 'audio', got {cfg.train_modules!r}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else 2
    path, rest = (argv[0], argv[1:]) if not argv[0].startswith("--") else (None, argv)
    try:
        cfg = resolve_config(path, rest)
        from higgs_ds.train.swift.launch import run_training  # heavy imports only once the config is good

        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        if int(os.environ.get("RANK", "0")) == 0:
            # the resolved config, credentials redacted ([swift] hub_token and the like never reach a file)
            atomic_write_json(Path(cfg.output_dir) / "higgs_ds_config.json", redact(to_dict(cfg)))
        run_training(cfg)
    except UserError as err:  # ConfigError included; one line and exit 2 on every rank that hits it
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
