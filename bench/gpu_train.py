"""Training throughput of the full-size model on this machine's GPU(s), printed as one JSON object.

    python bench/gpu_train.py [--steps 12] [--size released|tiny] [--max-tokens 16384]

Builds the released Higgs-Audio v2 architecture (5.77 B parameters, random bf16 weights, no download),
generated shards of 8-20 s utterances (random codes: the model's cost does not depend on their values),
then runs the real path: launch/torchrun.sh -> higgs-ds train (ms-swift + DeepSpeed ZeRO-3, bf16, one
process per GPU, budget batching). Reports the mean over the steps after the first two of the metrics
the trainer logs: tokens_per_s, audio_hours_per_s, mfu (bf16 dense peak of the card), peak memory.
`--size tiny` runs the same path on the CPU in a minute (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["released", "tiny"], default="released")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=16384, help="expanded positions per micro-batch")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    import torch
    from loader import make_shards  # bench/loader.py: shards of generated codes with stored tokens

    from higgs_ds.models.tiny import RELEASED_TEXT, TINY_TEXT, write_tiny

    gpus = torch.cuda.device_count()
    if args.size == "released" and not gpus:
        raise SystemExit("no GPU: the released size needs one (use --size tiny to check the script on a CPU)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-train-"))
    model = work / "model"
    if not (model / "config.json").is_file():
        text, dtype = (RELEASED_TEXT, "bfloat16") if args.size == "released" else (TINY_TEXT, "float32")
        write_tiny(model, text=text, dtype=dtype)
    shards = work / "shards"
    if not (shards / "index.json").is_file():
        make_shards(shards, model, args.samples, min_seconds=8, max_seconds=20)
    out = work / "train"
    overrides = [
        "--model",
        str(model),
        "--output_dir",
        str(out),
        "--data.shards",
        json.dumps([str(shards)]),
        "--data.max_tokens",
        str(args.max_tokens),
        "--data.num_workers",
        "2",
        "--max_steps",
        str(args.steps),
        "--save_steps",
        str(10**9),
        "--logging_steps",
        "1",
        "--resume",
        "never",
        "--learning_rate",
        "1e-5",
        "--dtype",
        "bfloat16" if gpus else "float32",
        "--activation_checkpointing",
        "true" if args.size == "released" else "false",
    ]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHON=sys.executable,
        NPROC_PER_NODE=str(gpus or 2),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"),
    )
    run = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), str(REPO / "configs" / "demo.toml"), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    (work / "train.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise SystemExit(f"training failed (exit {run.returncode}); log: {work / 'train.log'}\n{run.stderr[-3000:]}")
    logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines() if line.strip()]
    history = [h for entry in logs for h in entry.get("log_history", []) if "tokens_per_s" in h][2:]
    if not history:
        raise SystemExit(f"no step metrics in {out / 'logging.jsonl'}")

    def mean(key):
        values = [h[key] for h in history if key in h]
        return round(sum(values) / len(values), 4) if values else None

    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if gpus else "cpu",
                "gpus": gpus,
                "size": args.size,
                "tokens_per_s": mean("tokens_per_s"),
                "audio_hours_per_s": mean("audio_hours_per_s"),
                "mfu": mean("mfu"),
                "peak_memory_gb": max(h.get("memory_gb", 0) for h in history),
                "steps_measured": len(history),
                "max_tokens_per_micro_batch": args.max_tokens,
                "zero_stage": 3,
            }
        )
    )


if __name__ == "__main__":
    main()
