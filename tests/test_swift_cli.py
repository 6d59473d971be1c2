"""The plugin from ms-swift's own CLI: `swift sft --external_plugins higgs_ds/swift_plugin.py --dataset SHARD_DIR`
on 2 CPU ranks with ZeRO-3 (SWIFT's launcher starts torchrun itself when NPROC_PER_NODE is set), then a
resumed run, and the clear errors for a folder that is not a shard directory or shards of another codec."""

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, train_env
from .envs import SWIFT_MODEL_TYPE

PLUGIN = REPO / "higgs_ds" / "swift_plugin.py"
SWIFT = Path(sys.executable).parent / "swift"  # the console script installed with ms-swift


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swift_sft(model_dir, dataset, out, *extra, ranks=2, timeout=300, env=None):
    cmd = [
        str(SWIFT),
        "sft",
        "--external_plugins",
        str(PLUGIN),
        "--model",
        str(model_dir),
        "--model_type",
        SWIFT_MODEL_TYPE,
        "--template",
        "higgs_audio",
        "--dataset",
        str(dataset),
        "--output_dir",
        str(out),
        "--add_version",
        "false",
        "--check_model",
        "false",
        "--report_to",
        "none",
        # CPU: float32 weights and no fp16 mixed precision (SWIFT's default for float32 weights)
        "--torch_dtype",
        "float32",
        "--fp16",
        "false",
        *extra,
    ]
    env = dict(train_env(_free_port()), HIGGS_DS_LOG_SAMPLE_IDS="1", **(env or {}))
    if ranks == 1:
        env.pop("NPROC_PER_NODE")  # SWIFT runs one process without torchrun
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout)


TRAIN = [
    "--tuner_type",
    "full",
    "--deepspeed",
    str(REPO / "ds_configs" / "zero3.json"),
    "--max_steps",
    "6",
    "--save_steps",
    "3",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "1",
    "--learning_rate",
    "1e-3",
    "--lr_scheduler_type",
    "constant",
    # SWIFT's --gradient_checkpointing default (true) turns on the per-layer activation checkpointing
    "--dataloader_num_workers",
    "2",  # SWIFT forces 1 for iterable data in its trainer; the shard stream keeps what was asked
]


LOSS_ENV = {"HIGGS_DS_TEXT_WEIGHT": "0.5"}  # the loss settings SWIFT has no flags for


def sample_log(out: Path, rank: int) -> list[list[str]]:
    lines = (out / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["ids"] for line in lines]


def train_log(out: Path) -> list[dict]:
    lines = (out / "logging.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "audio_loss" in entry]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_shards, tiny_model_dir):
    out = tmp_path_factory.mktemp("swift-cli") / "run"
    run = swift_sft(tiny_model_dir, small_shards, out, *TRAIN, env=LOSS_ENV)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_swift_sft_trains_from_the_per_rank_shard_stream(cli_run, small_shards, tiny_model_dir):
    from transformers import AutoTokenizer

    from higgs_ds.stream.loader import DataConfig, ShardStream

    out, log = cli_run
    assert "num_workers=2" in log  # read from --dataloader_num_workers before SWIFT's trainer forces 1
    # every rank read exactly what its own ShardStream plans: 6 steps = 3 epochs of 2 micro-batches
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(shards=[str(small_shards)], batch_size=2, seed=42)  # SWIFT's --data_seed default
    seen = {rank: sample_log(out, rank) for rank in (0, 1)}
    for rank in (0, 1):
        stream = ShardStream(cfg, tokenizer, rank=rank, world_size=2)
        planned = []
        for epoch in range(3):
            stream.epoch = epoch
            planned += [[s.sample_id for s in batch] for batch in stream]
        assert seen[rank] == planned
    for epoch in range(3):  # the ranks' shares of each epoch are disjoint and cover the 8 samples
        share = [set(sum(seen[rank][2 * epoch : 2 * epoch + 2], [])) for rank in (0, 1)]
        assert not share[0] & share[1] and len(share[0] | share[1]) == 8

    history = train_log(out)  # our loss and metrics, through SWIFT's logging
    assert len(history) == 6 and all(math.isfinite(h["loss"]) for h in history)
    assert all(f"audio_loss_cb{k}" in h and "text_loss" in h and "tokens_per_s" in h for h in history for k in range(8))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5, (history[0], history[-1])
    for h in history:  # $HIGGS_DS_TEXT_WEIGHT=0.5 reached the loss: each logged value is the step's mean
        assert h["loss"] == pytest.approx(0.5 * h["text_loss"] + h["audio_loss"], rel=1e-3), h
    assert log.count("[higgs-ds] step 6/6") == 1  # the dense log callback, added once

    ckpt = out / "checkpoint-3"
    for rank in (0, 1):  # 3 micro-batches taken: epoch 1, 1 batch done
        state = json.loads((ckpt / f"data_state_rank{rank}.json").read_text())
        assert (state["epoch"], state["batches_done"], state["world_size"]) == (1, 1, 2)
    partitions = sorted(p.name for p in (ckpt / "global_step3").glob("*optim_states.pt"))
    assert partitions == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_swift_sft_resumes_at_the_saved_data_position(cli_run, small_shards, tiny_model_dir):
    out, _ = cli_run
    resumed = out.parent / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    run = swift_sft(
        tiny_model_dir,
        small_shards,
        resumed,
        *TRAIN,
        "--resume_from_checkpoint",
        str(resumed / "checkpoint-3"),
        env=LOSS_ENV,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "data position restored: epoch 1, 1 batches done" in run.stdout + run.stderr
    for rank in (0, 1):  # steps 4-6 read the same batches as the uninterrupted run
        assert sample_log(resumed, rank) == sample_log(out, rank)[3:]
    first, again = train_log(out)[3:], train_log(resumed)
    assert [h["global_step/max_steps"] for h in again] == ["4/6", "5/6", "6/6"]
    for a, b in zip(first, again, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_swift_sft_refuses_resume_only_model_which_would_restart_the_data(cli_run, small_shards, tiny_model_dir):
    out, _ = cli_run  # ms-swift's resume_only_model drops the saved data position: samples would repeat
    again = out.parent / "only-model"
    again.mkdir()
    shutil.copytree(out / "checkpoint-3", again / "checkpoint-3")
    for script in (again / "checkpoint-3").glob("*.py"):  # else refused as a model dir carrying code
        script.unlink()  # (SWIFT loads the model from the checkpoint), before the trainer is reached
    run = swift_sft(
        tiny_model_dir,
        small_shards,
        again,
        *TRAIN,
        *("--resume_from_checkpoint", str(again / "checkpoint-3"), "--resume_only_model", "true"),
        ranks=1,
    )
    assert run.returncode != 0
    assert "--resume_only_model would restart the shard stream" in run.stderr
    assert "HIGGS_DS_RESUME_RESET_OPTIMIZER=1" in run.stderr and "Traceback" not in run.stderr
    assert not (again / "samples_rank0.jsonl").exists()  # refused before a step was taken


@pytest.mark.timeout(200)
def test_swift_sft_names_a_bad_shard_directory_without_a_traceback(tmp_path, small_shards, tiny_model_dir):
    empty = tmp_path / "not-shards"
    empty.mkdir()
    run = swift_sft(tiny_model_dir, empty, tmp_path / "a", "--max_steps", "2", ranks=1)
    assert run.returncode != 0
    assert f"higgs-ds: error: --dataset {empty} has no index.json" in run.stderr
    assert "Traceback" not in run.stderr

    other = tmp_path / "other-codec"
    shutil.copytree(small_shards, other)
    index = json.loads((other / "index.json").read_text())
    index["codec"]["num_codebooks"] = 4
    (other / "index.json").write_text(json.dumps(index))
    run = swift_sft(tiny_model_dir, other, tmp_path / "b", "--max_steps", "2", ranks=1)
    assert run.returncode != 0
    assert "codec of num_codebooks=4, the model expects 8" in run.stderr and "Traceback" not in run.stderr
    assert "model_info:" not in run.stderr + run.stdout  # refused before the model is loaded
