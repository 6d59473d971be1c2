#!/usr/bin/env bash
# Start `higgs-ds train` on this node with torchrun; run the same line on every node.
#
#   launch/torchrun.sh [--dry-run] CONFIG.toml [--key value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE [the GPUs this process may use: CUDA_VISIBLE_DEVICES, else the SLURM allocation
#                   (SLURM_STEP_GPUS, SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS), else nvidia-smi -L; 1 without GPUs]
#   NNODES [1]  NODE_RANK [0]
#   MASTER_ADDR, MASTER_PORT: the first node's address and a free port, the same on every node. One node:
#                   [torchrun picks a free port itself (--standalone)]. Several: MASTER_ADDR is required;
#                   MASTER_PORT [derived from SLURM_JOB_ID inside a SLURM job, else required]
#   RDZV_ENDPOINT (host:port; set it to use c10d rendezvous instead of MASTER_ADDR/NODE_RANK) [unset]
#   PYTHON [python3]: the interpreter of the environment higgs-ds is installed in
# --dry-run prints the resolved command instead of running it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 1 ]]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || higgs_fail "NNODES=$NNODES is not a positive number of nodes"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(higgs_gpu_count)
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1  # no GPU: one CPU process
fi
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
  higgs_fail "NPROC_PER_NODE=$NPROC_PER_NODE is not a positive number of processes per node"

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rendezvous=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-higgs-ds}")
elif [[ $NNODES == 1 && -z "${MASTER_PORT:-}" ]]; then
  # one node: torchrun's c10d store on a port the kernel picks, so runs sharing a machine never collide
  rendezvous=(--standalone)
else
  if [[ -z "${MASTER_PORT:-}" && -n "${SLURM_JOB_ID:-}" ]]; then MASTER_PORT=$(higgs_job_port "$SLURM_JOB_ID"); fi
  if [[ $NNODES -gt 1 && ( -z "${MASTER_ADDR:-}" || -z "${MASTER_PORT:-}" ) ]]; then
    higgs_fail "NNODES=$NNODES: set MASTER_ADDR and MASTER_PORT (the first node's address and a free port," \
      "the same on every node), or RDZV_ENDPOINT"
  fi
  [[ $MASTER_PORT =~ ^[0-9]+$ && $MASTER_PORT -ge 1 && $MASTER_PORT -le 65535 ]] ||
    higgs_fail "MASTER_PORT=$MASTER_PORT is not a port number (1-65535)"
  rendezvous=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
fi

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rendezvous[@]}"
     -m higgs_ds.train.run "$@")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
