# Shell helpers shared by the launch scripts (sourced, never run):
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#   higgs_gpu_count            -> GPUs this process may use (see the precedence below)
#   higgs_job_port JOB_ID [HOST_LOCAL]  -> a rendezvous port for a SLURM job
#   higgs_json_list ITEM ...   -> a JSON list of strings, built by Python's encoder (paths with quotes, spaces)
#   higgs_fail MESSAGE         -> `higgs-ds: error: MESSAGE` on stderr, exit 2 (the CLI's user-error code)

higgs_fail() {
  echo "higgs-ds: error: $*" >&2
  exit 2
}

# How many GPUs this process may use. The first of these that is set decides:
#   1. CUDA_VISIBLE_DEVICES   what CUDA will show the workers (SLURM sets it from the allocation; a user who
#                             narrows it inside a job knows best). Read as CUDA reads it: entries up to the
#                             first invalid one; "" or "-1" means none.
#   2. SLURM_STEP_GPUS, SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS   the allocation on this node
#   3. nvidia-smi -L          every GPU of the machine (no allocation and no restriction)
# Prints 0 when there is none.
higgs_gpu_count() {
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    _higgs_count_cuda_list "$CUDA_VISIBLE_DEVICES"
  elif [[ -n ${SLURM_STEP_GPUS:-} ]]; then
    _higgs_count_list "$SLURM_STEP_GPUS"
  elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    [[ $SLURM_GPUS_ON_NODE =~ ^[0-9]+$ ]] || higgs_fail "SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE is not a number"
    echo $((10#$SLURM_GPUS_ON_NODE))
  elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then
    _higgs_count_list "$SLURM_JOB_GPUS"
  else
    _higgs_smi_count
  fi
}

_higgs_smi_count() {
  # grep -c prints 0 (and fails) when nothing matches; nvidia-smi is missing on CPU machines
  (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true
}

_higgs_count_list() {
  local IFS=, n=0 item
  for item in $1; do [[ -n ${item// /} ]] && n=$((n + 1)); done
  echo "$n"
}

# CUDA stops at the first entry that names no device: "0,2,-1,3" shows two GPUs, "0,7" on a 4-GPU
# machine one. Indices are checked against nvidia-smi when it is there; UUIDs (GPU-..., MIG-...) count.
_higgs_count_cuda_list() {
  local IFS=, n=0 item physical
  physical=$(_higgs_smi_count)
  for item in $1; do
    item=${item// /}
    if [[ $item =~ ^[0-9]+$ ]]; then
      [[ $physical -gt 0 && $((10#$item)) -ge $physical ]] && break
    elif [[ ! $item =~ ^(GPU|MIG)- ]]; then
      break
    fi
    n=$((n + 1))
  done
  echo "$n"
}

# A rendezvous port for SLURM job JOB_ID: spread over 10000-32767 (below Linux's ephemeral range, where
# outgoing connections take their ports), so jobs whose ids are close never share one. With HOST_LOCAL=1
# (the caller runs on the rendezvous host itself, as the batch script does), a port some process already
# uses is skipped for the next free one; without it every node computes the same port.
higgs_job_port() {
  local job=$1 host_local=${2:-0} base=10000 span=22768 port tries
  [[ $job =~ ^[0-9]+$ ]] || higgs_fail "SLURM job id '$job' is not a number: set MASTER_PORT"
  port=$((base + (10#$job * 7919) % span))  # 7919 is prime to span: consecutive ids land far apart
  if [[ $host_local == 1 ]]; then
    for ((tries = 0; tries < 200; tries++)); do
      _higgs_port_in_use "$port" || break
      port=$((base + (port - base + 1) % span))
    done
  fi
  echo "$port"
}

# Whether any TCP socket on this host has local port $1 (from /proc/net; no connection is made).
_higgs_port_in_use() {
  local hex tables=() table
  hex=$(printf '%04X' "$1")
  for table in /proc/net/tcp /proc/net/tcp6; do [[ -r $table ]] && tables+=("$table"); done
  [[ ${#tables[@]} -gt 0 ]] || return 1
  awk -v want=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == want { found = 1 } END { exit !found }' \
    "${tables[@]}"
}

higgs_json_list() {
  "${PYTHON:-python3}" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"
}
