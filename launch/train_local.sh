#!/usr/bin/env bash
# One line from data to a trained model on this machine:
#
#   launch/train_local.sh DATA OUTPUT_DIR [MODEL_DIR] [--key value ...]
#
#   DATA        a manifest (.jsonl: its shards are built first, into OUTPUT_DIR/shards) or a shard directory
#   OUTPUT_DIR  shards (if built), checkpoints and logs (OUTPUT_DIR/train), the export (OUTPUT_DIR/export)
#   MODEL_DIR   the model to fine-tune [a tiny random-weight Higgs-Audio, written to OUTPUT_DIR/tiny-model]
#   --key value any `higgs-ds train` setting (higgs-ds train --help)
#
# Runs on every GPU this process may use (CUDA_VISIBLE_DEVICES, else the SLURM allocation, else nvidia-smi;
# see launch/common.sh), or on 2 CPU ranks where there is none. Environment: PYTHON [python3], NPROC_PER_NODE,
# CONFIG [configs/demo.toml], CODEC for building shards [tiny; the released codec's folder for real data].
# A LoRA run (--tuner lora) is exported with its adapters merged into the base model.
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -e $1 ]] || higgs_fail "DATA $1 does not exist: give a manifest (.jsonl) or a shard directory"
data=$(realpath "$1"); out=$(realpath -m "$2"); shift 2
model=""
if [[ $# -gt 0 && $1 != --* ]]; then
  [[ -d $1 ]] || higgs_fail "MODEL_DIR $1 is not a directory: give a model directory, or leave it out for a tiny one"
  model=$(realpath "$1"); shift
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
mkdir -p "$out"

if [[ -z $model ]]; then
  model=$out/tiny-model
  [[ -f $model/config.json ]] || "$PYTHON" -m higgs_ds.cli tiny-model "$model"
fi
if [[ -f $data ]]; then
  shards=$out/shards
  if [[ ! -f $shards/index.json ]]; then
    echo "[train_local] building shards of $data into $shards"
    "$PYTHON" -m higgs_ds.cli shards build "$data" --out "$shards" --codec "${CODEC:-tiny}" --tokenizer "$model" \
      --resume
  fi
else
  shards=$data
fi

gpus=$(higgs_gpu_count)
export NPROC_PER_NODE=${NPROC_PER_NODE:-$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2)}
echo "[train_local] training $model on $shards with $NPROC_PER_NODE rank(s) into $out/train"
launch/torchrun.sh "${CONFIG:-configs/demo.toml}" --model "$model" --data.shards "$(higgs_json_list "$shards")" \
  --output_dir "$out/train" --dtype auto "$@"
# Checkpoints of a LoRA run hold adapters (adapter_config.json), which export merges only when asked.
merge=()
for adapter in "$out"/train/checkpoint-*/adapter_config.json; do [[ -f $adapter ]] && merge=(--merge-lora); done
"$PYTHON" -m higgs_ds.cli export "$out/train" --out "$out/export" ${merge[@]+"${merge[@]}"}  # bash < 4.4: empty array under set -u
echo "[train_local] done: checkpoints in $out/train, model in $out/export"
