"""The launch scripts (launch/torchrun.sh, launch/train_local.sh, launch/common.sh) with fake environments.

The GPU tool is a stand-in (a `nvidia-smi` on PATH that lists 8 GPUs); the interpreter is a stub that records
what it is given, so nothing trains here. train.sbatch runs on a real SLURM cluster in tests/test_slurm.py.
"""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

TORCHRUN = str(REPO / "launch" / "torchrun.sh")
TRAIN_LOCAL = str(REPO / "launch" / "train_local.sh")
COMMON = str(REPO / "launch" / "common.sh")
# a shard directory name that pasting into a JSON string breaks: quotes, an apostrophe, spaces, a backslash
AWKWARD = 'it\'s "my" shards \\ dir'


@pytest.fixture
def fake_smi(tmp_path) -> Path:
    """A directory with an nvidia-smi that lists 8 GPUs, as on an 8-GPU node where nothing restricts them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(8))
    (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\n[ "$1" = -L ] && printf "{lines}"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    return bin_dir


def _clean_env(fake_smi: Path, **extra) -> dict:
    """No CUDA_VISIBLE_DEVICES, SLURM_* or MASTER_* of the machine running the tests."""
    env = {"PATH": f"{fake_smi}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "PYTHON": "python-x"}
    return {**env, **extra}


def _dry_run(env: dict, *args: str) -> list[str]:
    run = subprocess.run(
        ["bash", TORCHRUN, "--dry-run", "cfg.toml", *args], env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    return shlex.split(run.stdout)


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "env, processes",
    [
        ({}, "8"),  # nothing restricts the GPUs: all that nvidia-smi lists
        ({"CUDA_VISIBLE_DEVICES": "0,2"}, "2"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-00000003,GPU-00000005,GPU-00000007"}, "3"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,-1,3"}, "2"),  # CUDA stops at the first invalid entry
        ({"CUDA_VISIBLE_DEVICES": "6,9"}, "1"),  # there is no GPU 9
        ({"CUDA_VISIBLE_DEVICES": ""}, "1"),  # no GPU at all: one CPU process
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "7"}, "4"),
        ({"SLURM_STEP_GPUS": "1,5,6", "SLURM_JOB_GPUS": "1,2,5,6"}, "3"),
        ({"SLURM_JOB_GPUS": "2,3"}, "2"),
        ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "3"}, "1"),  # CUDA_VISIBLE_DEVICES comes first
        ({"NPROC_PER_NODE": "3", "CUDA_VISIBLE_DEVICES": "0,2"}, "3"),  # an explicit count wins
    ],
)
def test_torchrun_counts_the_gpus_this_process_may_use(fake_smi, env, processes):
    cmd = _dry_run(_clean_env(fake_smi, **env), "--data.shards", json.dumps([AWKWARD]))
    assert _value(cmd, "--nproc_per_node") == processes, cmd
    assert json.loads(_value(cmd, "--data.shards")) == [AWKWARD]  # arguments pass through whole


@pytest.mark.timeout(60)
def test_torchrun_rendezvous_ports(fake_smi):
    # one node, no port given: torchrun's own free port (c10d store on port 0), never a fixed 29500
    one = _dry_run(_clean_env(fake_smi))
    assert "--standalone" in one and "--master_port" not in one, one
    given = _dry_run(_clean_env(fake_smi, MASTER_PORT="23456"))
    assert _value(given, "--master_port") == "23456" and "--standalone" not in given
    # several nodes in a SLURM job: every node derives the same port from the job id
    slurm = _clean_env(fake_smi, NNODES="2", MASTER_ADDR="node1", SLURM_JOB_ID="123456")
    ports = {_value(_dry_run(dict(slurm, NODE_RANK=str(r))), "--master_port") for r in (0, 1)}
    assert len(ports) == 1 and 10000 <= int(ports.pop()) <= 32767


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "2"}, "NNODES=2: set MASTER_ADDR and MASTER_PORT"),
        ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "NNODES=2: set MASTER_ADDR and MASTER_PORT"),
        ({"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE=eight is not a positive number"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a port number"),
        ({"NNODES": "0"}, "NNODES=0 is not a positive number of nodes"),
    ],
)
def test_torchrun_refuses_settings_that_cannot_work(fake_smi, env, message):
    run = subprocess.run(
        ["bash", TORCHRUN, "--dry-run", "cfg.toml"], env=_clean_env(fake_smi, **env), capture_output=True, text=True
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith("higgs-ds: error: ") and message in run.stderr, run.stderr


def _job_port(job: int, host_local: int = 0) -> int:
    run = subprocess.run(
        ["bash", "-c", f'source "{COMMON}" && higgs_job_port {job} {host_local}'],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(run.stdout)


@pytest.mark.timeout(60)
def test_job_port_is_spread_and_skips_a_port_in_use():
    # jobs with nearby ids (sharing a node) never share a port
    run = subprocess.run(
        ["bash", "-c", f'source "{COMMON}" && for j in $(seq 5000 5999); do higgs_job_port $j; done'],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ports = [int(p) for p in run.stdout.split()]
    assert len(set(ports)) == 1000 and all(10000 <= p <= 32767 for p in ports)

    job = 4242
    port = _job_port(job, host_local=1)
    with socket.socket() as busy:  # another job's rendezvous on this host holds it
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("0.0.0.0", port))
        busy.listen()
        other = _job_port(job, host_local=1)
        assert other != port and 10000 <= other <= 32767
        with socket.socket() as probe:  # the new one is free
            probe.bind(("0.0.0.0", other))
        assert _job_port(job) == port  # without host_local every node computes the same, unprobed


def _stub_python(tmp_path: Path) -> Path:
    """An interpreter that records each call and, for torchrun, writes the checkpoint a run of FAKE_TUNER leaves."""
    stub = tmp_path / "python"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        "if args[:1] == ['-c']:\n"
        f"    os.execv({sys.executable!r}, [{sys.executable!r}, *args])\n"
        "with open(os.environ['CALLS'], 'a') as f:\n"
        "    f.write(json.dumps(args) + '\\n')\n"
        "if 'torch.distributed.run' in args:\n"
        "    ckpt = os.path.join(args[args.index('--output_dir') + 1], 'checkpoint-3')\n"
        "    os.makedirs(ckpt)\n"
        "    open(os.path.join(ckpt, 'trainer_state.json'), 'w').write('{}')\n"
        "    if os.environ['FAKE_TUNER'] == 'lora':\n"
        "        open(os.path.join(ckpt, 'adapter_config.json'), 'w').write('{}')\n"
    )
    stub.chmod(0o755)
    return stub


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tuner", ["lora", "full"])
def test_train_local_passes_paths_as_json_and_exports_lora_merged(tmp_path, fake_smi, tuner):
    data = tmp_path / AWKWARD
    data.mkdir()
    model = tmp_path / 'model "dir"'
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out's dir"
    calls = tmp_path / "calls.jsonl"
    env = _clean_env(
        fake_smi, PYTHON=str(_stub_python(tmp_path)), CALLS=str(calls), FAKE_TUNER=tuner, CUDA_VISIBLE_DEVICES="0,2"
    )
    run = subprocess.run(
        ["bash", TRAIN_LOCAL, str(data), str(out), str(model), "--tuner", tuner],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    train, export = recorded[-2], recorded[-1]
    assert train[:2] == ["-m", "torch.distributed.run"] and _value(train, "--nproc_per_node") == "2"
    assert json.loads(_value(train, "--data.shards")) == [str(data)]
    assert _value(train, "--model") == str(model) and _value(train, "--output_dir") == str(out / "train")
    assert export[:4] == ["-m", "higgs_ds.cli", "export", str(out / "train")]
    assert _value(export, "--out") == str(out / "export")
    assert ("--merge-lora" in export) == (tuner == "lora"), export


@pytest.mark.timeout(60)
def test_train_local_refuses_missing_data_by_name(tmp_path, fake_smi):
    missing = tmp_path / "no such data"
    run = subprocess.run(
        ["bash", TRAIN_LOCAL, str(missing), str(tmp_path / "out")],
        env=_clean_env(fake_smi),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and not (tmp_path / "out").exists()
    assert run.stderr.startswith(f"higgs-ds: error: DATA {missing} does not exist: give a manifest"), run.stderr
