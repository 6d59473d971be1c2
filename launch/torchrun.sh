#!/usr/bin/env bash
# Start `higgs-ds train` on this node with torchrun; run the same line on every node.
#
#   launch/torchrun.sh [--dry-run] CONFIG.toml [--key value ...]
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   NPROC_PER_NODE [number of visible GPUs, or 1 without GPUs]
#   RDZV_ENDPOINT (host:port; set it to use c10d rendezvous instead of MASTER_ADDR/NODE_RANK) [unset]
#   PYTHON [python3]: the interpreter of the environment higgs-ds is installed in
# --dry-run prints the resolved command instead of running it.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 1 ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rendezvous=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-higgs-ds}")
else
  rendezvous=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rendezvous[@]}"
     -m higgs_ds.train "$@")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
