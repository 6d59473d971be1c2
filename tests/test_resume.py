"""Stop-and-resume through the real stack (2 ranks, ZeRO-3, SWIFT): full fine-tuning asked to stop mid-way
(it saves a checkpoint and exits), LoRA killed outright (SIGKILL) after a checkpoint; the next run on the
same output_dir resumes from the newest complete checkpoint, and the result equals an uninterrupted run's:
the same number of optimizer steps, the same samples in the same order, the same losses."""

import json
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest
import torch

from higgs_ds.train.checkpoint import is_complete, latest_complete

from .conftest import REPO, torchrun_train, train_cmd, train_env


def _overrides(tuner):
    return [
        *("--tuner", tuner, "--max_steps", "10", "--save_steps", "3", "--data.batch_size", "2"),
        *("--learning_rate", "1e-2" if tuner == "lora" else "3e-3"),  # LoRA's B starts at 0: a larger step
        *("--save_probe", "false", "--log_sample_ids", "true"),
    ]


def _train(out, model_dir, shards, port, tuner):
    return torchrun_train(out, model_dir, shards, *_overrides(tuner), port=port, timeout=420)


def _reached(out, step: int) -> bool:
    log = out / "samples_rank0.jsonl"
    return log.exists() and any(json.loads(x)["step"] >= step for x in log.read_text().splitlines())


def _stop_on_request(out, model_dir, shards, port, tuner) -> int:
    """Like the SLURM script on its pre-timeout signal: STOP once step 4 is under way. Returns the saved step."""
    out.mkdir()

    def request_stop():
        while not _reached(out, 4):
            time.sleep(0.1)
        (out / "STOP").touch()

    threading.Thread(target=request_stop, daemon=True).start()
    assert "stopped on request at step" in _train(out, model_dir, shards, port, tuner)
    stopped_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert 4 <= stopped_at < 10 and is_complete(out / f"checkpoint-{stopped_at}")
    return stopped_at


def _kill_after_a_checkpoint(out, model_dir, shards, port, tuner) -> int:
    """SIGKILL every process of a run once step 5 is under way (checkpoint-3 is complete), as a node failure
    or the OOM killer would. Returns the step of the newest complete checkpoint left behind."""
    out.mkdir()
    with open(out / "killed.log", "w") as log:
        proc = subprocess.Popen(
            train_cmd(out, model_dir, shards, *_overrides(tuner)),
            cwd=REPO,
            env=train_env(port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while not _reached(out, 5):
            assert proc.poll() is None, (out / "killed.log").read_text()[-3000:]
            time.sleep(0.1)
        # every process of the run: torchrun's workers may sit in sessions of their own
        for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            child.send_signal(signal.SIGKILL)
        proc.wait()
    stopped_at = int(latest_complete(out).name.split("-")[1])
    assert 3 <= stopped_at < 10
    return stopped_at


def _samples(out, rank):
    """Per step, the sample ids of its last run: a killed run's steps after its checkpoint are trained again."""
    lines = [json.loads(line) for line in (out / f"samples_rank{rank}.jsonl").read_text().splitlines()]
    return list({line["step"]: line for line in lines}.values())


def _losses(out):
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    return {h["step"]: (h["audio_loss"], h["text_loss"]) for h in state["log_history"] if "audio_loss" in h}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, small_shards, tuner):
    port = 21000 + os.getpid() % 5000 + (10 if tuner == "lora" else 0)
    whole = tmp_path / "whole"
    _train(whole, tiny_model_dir, small_shards, port, tuner)

    parted = tmp_path / "parted"
    interrupt = _kill_after_a_checkpoint if tuner == "lora" else _stop_on_request
    stopped_at = interrupt(parted, tiny_model_dir, small_shards, port + 1, tuner)

    second = _train(parted, tiny_model_dir, small_shards, port + 2, tuner)
    assert f"resuming from {parted / f'checkpoint-{stopped_at}'}" in second
    (tmp_path / "second.log").write_text(second)
    assert "[higgs-ds] step 10/10" in second

    for rank in (0, 1):
        want, got = _samples(whole, rank), _samples(parted, rank)
        assert [s["step"] for s in want] == list(range(1, 11))
        assert got == want  # no sample repeated or skipped, same order
    whole_losses, parted_losses = _losses(whole), _losses(parted)
    assert sorted(parted_losses) == list(range(1, 11))
    for step, (audio, text) in whole_losses.items():
        assert parted_losses[step] == pytest.approx((audio, text), rel=1e-4), step
    if tuner == "lora":  # the adapters were restored and trained on, not re-initialised at the resume
        from safetensors.torch import load_file

        want, got = (load_file(d / "checkpoint-10" / "adapter_model.safetensors") for d in (whole, parted))
        assert sorted(got) == sorted(want) and any(want[k].abs().max() > 0 for k in want if "lora_B" in k)
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)
