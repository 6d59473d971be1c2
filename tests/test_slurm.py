"""Launch: launch/slurm/train.sbatch on a real 2-node SLURM cluster on this host (tests/slurm_cluster.py).

The job script is submitted unchanged; resources come from sbatch options, settings from the environment.
Needs root (the daemons); the SLURM packages are installed with apt-get when missing.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .slurm_cluster import SlurmCluster

SCRIPT = str(REPO / "launch" / "slurm" / "train.sbatch")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the SLURM test cluster runs its daemons as root"),
]


@pytest.fixture(scope="module")
def slurm():
    with SlurmCluster(num_nodes=2) as cluster:
        yield cluster


def _env(python: str = sys.executable) -> dict:
    return dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHON=python, NPROC_PER_NODE="1")


def _train_args(tmp_path: Path, model: Path, shards: Path) -> list[str]:
    return [
        str(REPO / "configs" / "demo.toml"),
        "--model",
        str(model),
        "--output_dir",
        str(tmp_path / "train"),
        "--data.shards",
        json.dumps([str(shards)]),
        "--max_steps",
        "6",
        "--save_steps",
        "6",
        "--data.batch_size",
        "2",
    ]


def _submit(slurm, tmp_path: Path, args: list[str], env: dict) -> tuple[int, Path]:
    log = tmp_path / "job.out"
    job = slurm.sbatch(["--nodes=2", "--cpus-per-task=1", f"--output={log}", SCRIPT, *args], env=env, cwd=REPO)
    return job, log


def _report(slurm, job: int, log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no job log)"
    return f"job {job}: {slurm.job(job)}\n--- job log (end):\n{text[-4000:]}{slurm.logs()}"


@pytest.mark.timeout(900)  # includes bringing the cluster up (apt-get install on a fresh machine)
def test_two_nodes_train_to_a_zero3_checkpoint(slurm, tmp_path, tiny_model_dir, small_shards):
    job, log = _submit(slurm, tmp_path, _train_args(tmp_path, tiny_model_dir, small_shards), _env())
    state = slurm.wait(job, timeout=600)
    assert state == "COMPLETED", _report(slurm, job, log)

    text = log.read_text()
    assert "node1: node rank 0 of 2" in text and "node2: node rank 1 of 2" in text, text[-3000:]
    assert "[higgs-ds] step 6/6" in text
    ckpt = tmp_path / "train" / "checkpoint-6"
    partitions = sorted(p.name for p in (ckpt / "global_step6").glob("*optim_states.pt"))
    assert partitions == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    history = [h for h in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "audio_loss" in h]
    assert len(history) == 6


@pytest.mark.timeout(600)
def test_a_rank_that_dies_fails_the_whole_job_fast(slurm, tmp_path, tiny_model_dir, small_shards):
    # The second node's training process gets a model directory that does not exist: a real error from
    # higgs-ds on one node, after both torchruns have met, while the first node's rank waits for it.
    missing = tmp_path / "missing-model"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$SLURM_NODEID" = 1 ]; then exec {sys.executable} "$@" --model {missing}; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    args = _train_args(tmp_path, tiny_model_dir, small_shards)
    started = time.monotonic()
    job, log = _submit(slurm, tmp_path, args, _env(str(python)))
    state = slurm.wait(job, timeout=420)
    elapsed = time.monotonic() - started
    assert state == "FAILED", _report(slurm, job, log)
    # without srun --kill-on-bad-exit, node 1 would wait for its peer up to the rendezvous/collective timeouts
    assert elapsed < 240, f"the job took {elapsed:.0f} s to fail\n" + _report(slurm, job, log)
    text = log.read_text()
    assert f"higgs-ds train: error: model directory {missing} has no config.json" in text, text[-3000:]
    assert "node2" in text and "[higgs-ds] step" not in text, text[-3000:]
    assert not (tmp_path / "train" / "checkpoint-6").exists()


@pytest.mark.timeout(300)
def test_usr1_reaches_the_training_step_on_every_node(slurm, tmp_path):
    # A stand-in for the interpreter shows what the trainer will receive 120 s before the time limit.
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        "trap 'echo \"stub on $SLURMD_NODENAME: USR1\"; exit 0' USR1\n"
        'echo "stub on $SLURMD_NODENAME: ready"\n'
        "while :; do sleep 0.1; done\n"
    )
    python.chmod(0o755)
    job, log = _submit(slurm, tmp_path, ["configs/demo.toml"], _env(str(python)))
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count(": ready") == 2):
        assert time.monotonic() < deadline, _report(slurm, job, log)
        time.sleep(0.2)
    slurm.scancel(job, "--batch", "--signal=USR1")
    state = slurm.wait(job, timeout=60)
    text = log.read_text()
    assert state == "COMPLETED", _report(slurm, job, log)
    assert "USR1: forwarding to the training step" in text
    assert "stub on node1: USR1" in text and "stub on node2: USR1" in text, text
