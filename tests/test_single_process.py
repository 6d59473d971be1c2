"""Finding 11 of issue 10: a one-process run trains (a laptop user's first run, a single-GPU run), through
`NPROC_PER_NODE=1 launch/torchrun.sh` and through a plain `higgs-ds train CONFIG` without torchrun, with the
ZeRO-3 config and without DeepSpeed. Before, accelerate refused the CPU-only `use_configured_state` flag
with one process, and DeepSpeed without torchrun's environment went looking for MPI.

The same runs carry a `[swift] hub_token` (finding 8, the checkpoint side): no file the run writes, the
pickled training_args.bin included, may hold it."""

import json
import math
import os
import sys

import pytest
import torch

from .conftest import REPO, train_cmd, train_env

TOKEN = "hf_" + "Zq7" * 10  # looks like a Hugging Face token to anyone reading the files
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")


def _run(launcher: str, deepspeed: str, out, model_dir, shards, port: int):
    import subprocess

    overrides = ["--max_steps", "2", "--save_steps", "2", "--data.batch_size", "2", "--logging_steps", "1"]
    overrides += ["--save_probe", "false", "--deepspeed", deepspeed]
    # use_hf: SWIFT logs into the hub with the token at start; on Hugging Face's side that is a no-op offline
    overrides += ["--swift.hub_token", TOKEN, "--swift.use_hf", "true"]
    if launcher == "torchrun":
        cmd = train_cmd(out, model_dir, shards, *overrides)
        env = dict(train_env(port), NPROC_PER_NODE="1")
        del env["MASTER_PORT"]  # one node, no port given: torchrun.sh lets torchrun pick a free one (--standalone)
    else:  # what a laptop user types first: no torchrun, no distributed environment at all
        cmd = train_cmd(out, model_dir, shards, *overrides)[2:]  # CONFIG and the overrides
        cmd = [sys.executable, "-m", "higgs_ds.cli", "train", *cmd]
        env = {k: v for k, v in train_env(port).items() if k not in DIST_ENV}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "launcher, deepspeed",
    [("torchrun", "ds_configs/zero3.json"), ("torchrun", ""), ("plain", "ds_configs/zero3.json")],
    ids=["torchrun-zero3", "torchrun-no-deepspeed", "plain-zero3"],
)
def test_one_process_trains_and_saves_a_checkpoint(tmp_path, small_shards, tiny_model_dir, launcher, deepspeed):
    out = tmp_path / "run"
    run = _run(launcher, deepspeed, out, tiny_model_dir, small_shards, port=25000 + os.getpid() % 1000)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "use_configured_state" not in log and "mpi4py" not in log
    assert "[higgs-ds] step 2/2" in log

    ckpt = out / "checkpoint-2"
    history = [h for h in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "audio_loss" in h]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    state = json.loads((ckpt / "data_state_rank0.json").read_text())
    assert state["world_size"] == 1 and not (ckpt / "data_state_rank1.json").exists()
    if deepspeed:  # ZeRO-3 with one partition: the whole optimizer state on rank 0
        partitions = sorted(p.name for p in (ckpt / "global_step2").glob("*optim_states.pt"))
        assert partitions == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    else:
        assert (ckpt / "optimizer.pt").is_file() and (ckpt / "model.safetensors").is_file()
    _assert_token_nowhere(out)
    assert TOKEN not in log


def _assert_token_nowhere(out):
    """The token is in no file under the run's folder (logs, args.json, configs, TensorBoard events,
    checkpoints), and the pickled training arguments no longer hold it."""
    holding = [str(p) for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert holding == []
    checkpoint_args = torch.load(out / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert checkpoint_args.hub_token is None and checkpoint_args.output_dir == str(out)
    saved = json.loads((out / "args.json").read_text())
    assert saved["hub_token"] is None and saved["use_hf"] is True  # the rest of the arguments is kept


def test_pickled_training_arguments_leave_credentials_out_and_copies_keep_them(tmp_path):
    import copy
    import pickle

    from swift.trainers import Seq2SeqTrainingArguments

    from higgs_ds import swift_plugin  # noqa: F401  installs the pickling rule

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), hub_token=TOKEN, report_to=[], run_name=f"note {TOKEN}", use_cpu=True
    )
    blob = pickle.dumps(args)
    assert TOKEN.encode() not in blob
    loaded = pickle.loads(blob)
    assert loaded.hub_token is None and loaded.run_name == "note <redacted>" and loaded.output_dir == str(tmp_path)
    assert copy.deepcopy(args).hub_token == TOKEN and copy.copy(args).hub_token == TOKEN  # a push still works
    assert args.hub_token == TOKEN


def test_a_swift_config_file_is_copied_with_credentials_redacted(tmp_path):
    from higgs_ds.train.swift.redact import _copy_config_redacted

    config = tmp_path / "sft.yaml"
    config.write_text(f"model: /m\nhub_token: {TOKEN}\nswanlab_secret: s3cr3t-value\nlearning_rate: 0.001\n")
    out = tmp_path / "out"
    out.mkdir()
    _copy_config_redacted(str(config), str(out))
    import yaml

    copied = yaml.safe_load((out / "sft.yaml").read_text())
    assert copied == {"model": "/m", "hub_token": "<redacted>", "swanlab_secret": "<redacted>", "learning_rate": 0.001}
    plain = tmp_path / "plain.yaml"
    plain.write_text("# a comment kept as written\nmodel: /m\n")
    _copy_config_redacted(str(plain), str(out))
    assert (out / "plain.yaml").read_text() == plain.read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_explicit_resume_from_a_torn_checkpoint_is_refused_naming_it(tmp_path, small_shards, tiny_model_dir):
    """`resume = PATH` to a checkpoint whose trainer_state.json was cut short (a full disk): one error line
    naming it and saying what to do, exit 2; HF's own loader would fail deep inside with a JSON traceback."""
    import subprocess

    torn = tmp_path / "run" / "checkpoint-5"
    torn.mkdir(parents=True)
    (torn / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (torn / "trainer_state.json").write_text('{"global_step": 5, "log_hist')
    cmd = train_cmd(tmp_path / "run", tiny_model_dir, small_shards, "--max_steps", "8", "--deepspeed", "")
    cmd = [sys.executable, "-m", "higgs_ds.cli", "train", *cmd[2:], "--resume", str(torn)]
    env = {k: v for k, v in train_env(25999).items() if k not in DIST_ENV}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    errors = [line for line in run.stderr.splitlines() if line.startswith("higgs-ds: error:")]
    assert run.returncode == 2, run.stderr[-4000:]
    assert len(errors) == 1 and str(torn) in errors[0] and "earlier checkpoint" in errors[0], run.stderr[-4000:]
    assert "Traceback" not in run.stderr
