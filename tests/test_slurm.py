"""Launch: launch/slurm/train.sbatch and build_shards.sbatch on a real 2-node SLURM cluster on this host
(tests/slurm_cluster.py).

The job scripts are submitted unchanged; resources come from sbatch options, settings from the environment.
Needs root (the daemons); the SLURM packages are installed with apt-get when missing.
"""

import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .slurm_cluster import SlurmCluster

SCRIPT = str(REPO / "launch" / "slurm" / "train.sbatch")
SHARDS_SCRIPT = str(REPO / "launch" / "slurm" / "build_shards.sbatch")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the SLURM test cluster runs its daemons as root"),
]


@pytest.fixture(scope="module")
def slurm():
    with SlurmCluster(num_nodes=2) as cluster:
        yield cluster


def _env(python: str = sys.executable) -> dict:
    # stub interpreters stand in for the trainer only: they would also answer the preflight call
    return dict(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHON=python,
        NPROC_PER_NODE="1",
        PREFLIGHT="1" if python == sys.executable else "0",
    )


def _train_args(out: Path, model: Path, shards: Path, steps: int = 6, save_steps: int = 6, *extra: str) -> list[str]:
    return [
        str(REPO / "configs" / "demo.toml"),
        "--model",
        str(model),
        "--output_dir",
        str(out),
        "--data.shards",
        json.dumps([str(shards)]),
        "--max_steps",
        str(steps),
        "--save_steps",
        str(save_steps),
        "--data.batch_size",
        "2",
        *extra,
    ]


# the settings of tests/test_resume.py: 10 steps, a checkpoint every 3, the sample ids of every micro-batch
RESUME_SETTINGS = (10, 3, "--save_probe", "false", "--log_sample_ids", "true")


def _submit(slurm, tmp_path: Path, args: list[str], env: dict, name: str = "job") -> tuple[int, Path]:
    log = tmp_path / f"{name}.out"
    job = slurm.sbatch(["--nodes=2", "--cpus-per-task=1", f"--output={log}", SCRIPT, *args], env=env, cwd=REPO)
    return job, log


def _report(slurm, job: int, log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no job log)"
    return f"job {job}: {slurm.job(job)}\n--- job log (end):\n{text[-4000:]}{slurm.logs()}"


@pytest.mark.timeout(900)  # includes bringing the cluster up (apt-get install on a fresh machine)
def test_two_nodes_train_to_a_zero3_checkpoint(slurm, tmp_path, tiny_model_dir, small_shards):
    job, log = _submit(slurm, tmp_path, _train_args(tmp_path / "train", tiny_model_dir, small_shards), _env())
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
    args = _train_args(tmp_path / "train", tiny_model_dir, small_shards)
    started = time.monotonic()
    job, log = _submit(slurm, tmp_path, args, _env(str(python)))
    state = slurm.wait(job, timeout=420)
    elapsed = time.monotonic() - started
    assert state == "FAILED", _report(slurm, job, log)
    # without srun --kill-on-bad-exit, node 1 would wait for its peer up to the rendezvous/collective timeouts
    assert elapsed < 240, f"the job took {elapsed:.0f} s to fail\n" + _report(slurm, job, log)
    text = log.read_text()
    assert f"higgs-ds: error: model {missing} is not a local directory" in text, text[-3000:]
    assert "node2" in text and "[higgs-ds] step" not in text, text[-3000:]
    assert not (tmp_path / "train" / "checkpoint-6").exists()


def _stub(tmp_path: Path, body: str) -> str:
    """A stand-in for the interpreter: torchrun.sh runs it as `$PYTHON -m torch.distributed.run ...` on every node."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n" + 'say() { echo "stub on $SLURMD_NODENAME: $*"; }\n' + body)
    python.chmod(0o755)
    return str(python)


def _wait_for(predicate, what: str, timeout: float, report) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s\n" + report()
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_usr1_makes_the_stop_file_then_the_job_requeues_itself(slurm, tmp_path):
    # The stub behaves like the trainer: it ends with 0 once the stop file is there. USR1 must not reach it.
    stop = tmp_path / "stop-here"
    stop.touch()  # a stale request from an earlier attempt: the script removes it before starting srun
    python = _stub(
        tmp_path,
        "trap 'say USR1; exit 3' USR1\n"
        'say "restart ${SLURM_RESTART_COUNT:-0}, stop file $HIGGS_DS_STOP_FILE"\n'
        'if [ -e "$HIGGS_DS_STOP_FILE" ]; then say "stop file at start"; exit 4; fi\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        "  say ready\n"
        '  while [ ! -e "$HIGGS_DS_STOP_FILE" ]; do sleep 0.1; done\n'
        "  say stopping\n"
        "fi\n"
        "say done\n",
    )
    env = dict(_env(python), HIGGS_DS_STOP_FILE=str(stop))
    job, log = _submit(slurm, tmp_path, ["configs/demo.toml"], env)
    report = lambda: _report(slurm, job, log)  # noqa: E731
    _wait_for(lambda: log.exists() and log.read_text().count(": ready") == 2, "ready stubs", 120, report)
    slurm.scancel(job, "--batch", "--signal=USR1")
    state = slurm.wait(job, timeout=180)
    text = log.read_text()
    assert state == "COMPLETED", report()
    assert slurm.job(job)["Restarts"] == "1", report()
    assert f"USR1: asking training to stop after this step ({stop})" in text, text
    assert f"requeueing job {job}" in text, text
    for node in ("node1", "node2"):
        assert f"stub on {node}: stopping" in text, text
        assert f"stub on {node}: restart 1, stop file {stop}" in text, text
        assert f"stub on {node}: USR1" not in text and "stop file at start" not in text, text
    assert text.count(": done") == 4 and not stop.exists(), text


@pytest.mark.timeout(300)
def test_a_failed_step_after_usr1_fails_the_job_without_a_requeue(slurm, tmp_path):
    python = _stub(
        tmp_path,
        "say ready\n"
        'while [ ! -e "$HIGGS_DS_STOP_FILE" ]; do sleep 0.1; done\n'
        'if [ "$SLURM_NODEID" = 1 ]; then say failing; exit 1; fi\n',
    )
    job, log = _submit(slurm, tmp_path, ["configs/demo.toml"], _env(python))
    report = lambda: _report(slurm, job, log)  # noqa: E731
    _wait_for(lambda: log.exists() and log.read_text().count(": ready") == 2, "ready stubs", 120, report)
    slurm.scancel(job, "--batch", "--signal=USR1")
    state = slurm.wait(job, timeout=120)
    text = log.read_text()
    assert state == "FAILED" and slurm.job(job)["Restarts"] == "0", report()
    assert "stub on node2: failing" in text and "requeueing" not in text, text
    assert not (REPO / f".higgs-ds-stop-{job}").exists()  # the default stop file, removed on the way out


@pytest.mark.timeout(300)
def test_the_job_counts_its_gpus_derives_a_port_and_keeps_preflights_exit_code(slurm, tmp_path):
    # A stand-in GPU tool lists 8 GPUs on every node, CUDA_VISIBLE_DEVICES (exported by sbatch, as SLURM sets
    # it for an allocation) allows 2: preflight and torchrun must both plan 2 processes per node.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: Fake GPU"; done\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    python = _stub(tmp_path, 'say "$*"\nif [ "$3" = preflight ]; then exit "${PREFLIGHT_EXIT:-0}"; fi\n')
    env = dict(_env(python), PREFLIGHT="1", CUDA_VISIBLE_DEVICES="0,2", PATH=f"{bin_dir}:{os.environ['PATH']}")
    del env["NPROC_PER_NODE"]

    job, log = _submit(slurm, tmp_path, ["configs/demo.toml"], env, "gpus")
    assert slurm.wait(job, timeout=120) == "COMPLETED", _report(slurm, job, log)
    text = log.read_text()
    assert "stub on node1: -m higgs_ds.cli preflight configs/demo.toml --nodes 2 --gpus-per-node 2" in text, text
    port = re.search(r"rendezvous node1:(\d+),", text)
    assert port and 10000 <= int(port.group(1)) <= 32767, text
    for rank, node in enumerate(("node1", "node2")):
        want = f"stub on {node}: -m torch.distributed.run --nnodes 2 --nproc_per_node 2 --node_rank {rank} "
        assert want + f"--master_addr node1 --master_port {port.group(1)} -m higgs_ds.train.run" in text, text

    # preflight's exit code is the job's (2: a user error), and nothing is started
    job, log = _submit(slurm, tmp_path, ["configs/demo.toml"], dict(env, PREFLIGHT_EXIT="2"), "refused")
    assert slurm.wait(job, timeout=120) == "FAILED", _report(slurm, job, log)
    assert slurm.job(job)["ExitCode"] == "2:0", _report(slurm, job, log)
    text = log.read_text()
    assert "preflight refused the run" in text and "torch.distributed.run" not in text, text


def _samples(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"samples_rank{rank}.jsonl").read_text().splitlines()]


def _losses(out: Path, last: int = 10) -> dict:
    state = json.loads((out / f"checkpoint-{last}" / "trainer_state.json").read_text())
    return {h["step"]: (h["audio_loss"], h["text_loss"]) for h in state["log_history"] if "audio_loss" in h}


@pytest.mark.timeout(1200)
def test_usr1_saves_requeues_and_resumes_like_an_uninterrupted_run(slurm, tmp_path, tiny_v3, small_shards):
    # Both jobs run at once (each node has room for two 1-CPU tasks): the reference without a signal, the
    # other one gets the time-limit signal once step 4 is under way, and must requeue itself and resume.
    # The model is Higgs TTS 3 (the v2 family's requeue on fewer nodes is the last test here): the same
    # v2-tokenized shards, re-tokenized by the v3 stream.
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    ref, ref_log = _submit(
        slurm, tmp_path, _train_args(whole, tiny_v3, small_shards, *RESUME_SETTINGS), _env(), "whole"
    )
    job, log = _submit(slurm, tmp_path, _train_args(parted, tiny_v3, small_shards, *RESUME_SETTINGS), _env(), "parted")
    report = lambda: _report(slurm, job, log)  # noqa: E731

    samples = parted / "samples_rank0.jsonl"
    _wait_for(
        lambda: samples.exists() and any(json.loads(x)["step"] >= 4 for x in samples.read_text().splitlines()),
        "step 4",
        600,
        report,
    )
    slurm.scancel(job, "--batch", "--signal=USR1")  # what SLURM sends 120 s before the time limit
    state = slurm.wait(job, timeout=600)
    assert state == "COMPLETED", report()
    assert slurm.wait(ref, timeout=600) == "COMPLETED", _report(slurm, ref, ref_log)

    text = log.read_text()
    assert slurm.job(job)["Restarts"] == "1", report()
    stopped = re.search(r"stopped on request at step (\d+)", text)
    assert stopped, text[-4000:]
    stopped_at = int(stopped.group(1))
    assert 4 <= stopped_at < 10, text[-4000:]
    assert f"requeueing job {job}" in text and "restart 1, in" in text, text[-4000:]
    assert f"resuming from {parted / f'checkpoint-{stopped_at}'}" in text, text[-4000:]
    assert "[higgs-ds] step 10/10" in text.split("restart 1, in")[1]
    assert (parted / "checkpoint-10" / "trainer_state.json").is_file()

    for rank in (0, 1):
        want, got = _samples(whole, rank), _samples(parted, rank)
        assert sorted({s["step"] for s in want}) == list(range(1, 11))
        assert got == want, rank  # no micro-batch repeated or skipped, same order
    whole_losses, parted_losses = _losses(whole), _losses(parted)
    assert sorted(parted_losses) == list(range(1, 11)) == sorted(whole_losses)  # optimizer steps 1..10 once each
    for step, (audio, text_loss) in whole_losses.items():
        assert parted_losses[step] == pytest.approx((audio, text_loss), rel=1e-4), step
    assert "Research and Non-Commercial License" in text  # it trained the v3 family (its licence terms)


def _members(shard_dir: Path) -> list[tuple[str, dict]]:
    """(key, {member suffix: bytes}) over all shards of a directory, in the index's shard order."""
    out: dict[str, dict] = {}
    for shard in json.loads((shard_dir / "index.json").read_text())["shards"]:
        with tarfile.open(shard_dir / shard["file"]) as tar:
            for m in tar:
                key, suffix = m.name.split(".", 1)
                out.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return list(out.items())


@pytest.mark.timeout(600)
def test_job_array_builds_slices_and_the_dependent_job_merges_them(
    slurm, tmp_path, small_manifest, small_shards, tiny_model_dir
):
    out = tmp_path / "shards"
    env = _env()
    build = [
        "--array=0-2",
        f"--output={tmp_path}/build-%a.out",
        SHARDS_SCRIPT,
        str(out),
        "tiny",
        str(small_manifest),
        "--",
        "--shard-size",
        "3",
        "--tokenizer",
        str(tiny_model_dir),
    ]
    array = slurm.sbatch(build, env=env, cwd=tmp_path)
    merge = slurm.sbatch(
        [
            "--array=0",  # a single task: the script's own --array line applies to this submission too
            f"--dependency=afterok:{array}",
            "--kill-on-invalid-dep=yes",
            f"--output={tmp_path}/merge.out",
            SHARDS_SCRIPT,
            "--merge",
            str(out),
        ],
        env=env,
        cwd=tmp_path,
    )

    def report() -> str:
        logs = "".join(f"\n--- {p.name}:\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.out")))
        return f"array {array}, merge {merge}: {slurm.job(merge)}{logs}{slurm.logs()}"

    assert slurm.wait(merge, timeout=500) == "COMPLETED", report()
    for task in range(3):
        assert slurm.job(f"{array}_{task}")["JobState"] == "COMPLETED", report()
        assert f"slice {task}/3 of {small_manifest}" in (tmp_path / f"build-{task}.out").read_text()
    assert len(list(out.glob("index.slice-*-of-0003.json"))) == 3
    assert (tmp_path / "merge.out").read_text().count("merging the slices") == 1, report()

    merged, single = json.loads((out / "index.json").read_text()), json.loads((small_shards / "index.json").read_text())
    assert merged["build"]["slices"] == 3 and merged["build"]["accepted"] == 8, merged["build"]
    assert merged["num_samples"] == single["num_samples"]
    assert _members(out) == _members(small_shards)  # same keys, same json and codes bytes, same order
    assert (out / "rejects.jsonl").read_bytes() == (small_shards / "rejects.jsonl").read_bytes()


@pytest.mark.timeout(300)
def test_build_shards_script_slices_arguments_and_a_single_merge(slurm, tmp_path):
    # A stand-in interpreter prints what higgs-ds would be given.
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "task ${SLURM_ARRAY_TASK_ID:-none}: $*"\n')
    python.chmod(0o755)
    env = _env(str(python))

    def submit(name: str, *args: str, extra_env: dict | None = None) -> int:
        output = f"--output={tmp_path}/{name}-%a.out"
        return slurm.sbatch([output, *args], env={**env, **(extra_env or {})}, cwd=tmp_path)

    def tasks(job: int, ids) -> list[str]:
        return [slurm.wait(f"{job}_{i}", timeout=120) for i in ids]

    def text(name: str) -> str:
        return "".join(p.read_text() for p in sorted(tmp_path.glob(f"{name}-*.out")))

    # the script's default array (0-3) with extra build options after --
    job = submit("default", SHARDS_SCRIPT, "OUT", "CODEC", "a.jsonl", "b.jsonl", "--", "--shard-size", "5")
    assert tasks(job, range(4)) == ["COMPLETED"] * 4, text("default")
    for i in range(4):
        want = f"task {i}: -m higgs_ds.cli shards build a.jsonl b.jsonl --out OUT --codec CODEC --slice {i}/4 --resume"
        want += " --shard-size 5"
        assert want in text("default"), text("default")
    # rerunning some slices needs the slice count
    job = submit("partial", "--array=1,3", SHARDS_SCRIPT, "OUT", "CODEC", "a.jsonl")
    assert tasks(job, (1, 3)) == ["FAILED"] * 2 and "give the number of slices as NUM_SLICES" in text("partial")
    job = submit("numbered", "--array=1,3", SHARDS_SCRIPT, "OUT", "CODEC", "a.jsonl", extra_env={"NUM_SLICES": "8"})
    assert tasks(job, (1, 3)) == ["COMPLETED"] * 2, text("numbered")
    assert "--slice 1/8 --resume" in text("numbered") and "--slice 3/8 --resume" in text("numbered")
    # a merge submitted without --array=0 still merges once
    job = submit("merge", SHARDS_SCRIPT, "--merge", "OUT")
    assert tasks(job, range(4)) == ["COMPLETED"] * 4, text("merge")
    assert text("merge").count("-m higgs_ds.cli shards index OUT") == 1, text("merge")


def _step_samples(out: Path) -> dict[int, list[str]]:
    """Per optimizer step, the sorted sample ids of all its micro-batches, over every rank and attempt."""
    steps: dict[int, list[str]] = {}
    for log in sorted(out.glob("samples_rank*.jsonl")):
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], []).extend(rec["ids"])
    return {step: sorted(ids) for step, ids in sorted(steps.items())}


@pytest.mark.timeout(1500)
def test_a_requeued_job_that_gets_fewer_nodes_resumes_on_them(slurm, tmp_path, tiny_model_dir, shards16):
    """A 2-node job (2 ranks, one epoch of 16 samples = 8 optimizer steps) gets USR1 while node2 is drained:
    it saves, requeues and waits for 2 nodes; the operator lets it run on what is left (scontrol update
    NumNodes=1), and it resumes the 2-rank checkpoint on 1 rank, mid-epoch: DeepSpeed's universal
    checkpoint, the global data position, grad_accum 2 (keep_global_batch). Every step reads the samples
    the uninterrupted 2-node job read in it, and the losses equal its losses."""
    settings = ("--save_probe", "false", "--log_sample_ids", "true", "--data.batch_size", "1")
    whole, elastic = tmp_path / "whole", tmp_path / "elastic"
    # both jobs at once, one CPU of each node each: the reference and the one that loses a node
    ref, ref_log = _submit(slurm, tmp_path, _train_args(whole, tiny_model_dir, shards16, 8, 100, *settings),
                           _env(), "whole")  # fmt: skip
    job, log = _submit(slurm, tmp_path, _train_args(elastic, tiny_model_dir, shards16, 8, 100, *settings), _env())
    report = lambda: _report(slurm, job, log)  # noqa: E731
    samples = elastic / "samples_rank0.jsonl"
    _wait_for(
        lambda: samples.exists() and any(json.loads(x)["step"] >= 2 for x in samples.read_text().splitlines()),
        "step 2",
        600,
        report,
    )
    slurm.scontrol("update", "NodeName=node2", "State=DRAIN", "Reason=elastic-test")  # running jobs go on
    try:
        slurm.scancel(job, "--batch", "--signal=USR1")
        _wait_for(lambda: slurm.job(job).get("Restarts") == "1" and slurm.job(job)["JobState"] == "PENDING",
                  "the requeued job pending", 600, report)  # fmt: skip
        slurm.scontrol("update", f"JobId={job}", "NumNodes=1", "NumTasks=1")
        assert slurm.wait(job, timeout=900) == "COMPLETED", report()
    finally:
        slurm.scontrol("update", "NodeName=node2", "State=RESUME")
    assert slurm.wait(ref, timeout=600) == "COMPLETED", _report(slurm, ref, ref_log)

    text = log.read_text()
    stopped = re.search(r"stopped on request at step (\d+)", text)
    assert stopped and 2 <= int(stopped.group(1)) < 8, text[-4000:]  # inside the epoch: the resume continues it
    assert re.search(r": 1 node\(s\) node1, rendezvous \S+ restart 1, in", text), text[-4000:]
    second = text.split("restart 1, in")[1]
    assert "node rank 1 of" not in second
    assert "was saved on 2 ranks; this run has 1" in second and "on 1 ranks: grad_accum 2" in second, second[-4000:]
    assert "[higgs-ds] step 8/8" in second

    want, got = _step_samples(whole), _step_samples(elastic)
    assert sorted(want) == list(range(1, 9)) and got == want
    assert len({i for ids in want.values() for i in ids}) == 16 == sum(map(len, want.values()))  # the epoch once
    whole_losses = _losses(whole, 8)
    for step, loss in _losses(elastic, 8).items():
        assert loss == pytest.approx(whole_losses[step], rel=1e-5), step
