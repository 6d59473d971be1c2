"""Stop-and-resume through the real stack (2 ranks, ZeRO-3, SWIFT), full fine-tuning and LoRA: a run asked
to stop mid-way saves a checkpoint and exits; the next run on the same output_dir resumes from it, and the
result equals an uninterrupted run's: the same number of optimizer steps, the same samples in the same order,
the same losses."""

import json
import os
import threading
import time

import pytest
import torch

from higgs_ds.checkpoint import is_complete

from .conftest import torchrun_train


def _train(out, model_dir, shards, port, tuner):
    return torchrun_train(
        out,
        model_dir,
        shards,
        "--tuner",
        tuner,
        "--learning_rate",
        "1e-2" if tuner == "lora" else "3e-3",  # LoRA's B starts at 0: a larger step moves it visibly
        "--max_steps",
        "10",
        "--save_steps",
        "3",
        "--data.batch_size",
        "2",
        "--save_probe",
        "false",
        "--log_sample_ids",
        "true",
        port=port,
        timeout=420,
    )


def _samples(out, rank):
    return [json.loads(line) for line in (out / f"samples_rank{rank}.jsonl").read_text().splitlines()]


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
    parted.mkdir()

    def request_stop():  # like the SLURM script on its pre-timeout signal, once step 4 is under way
        log = parted / "samples_rank0.jsonl"
        while not (log.exists() and any(json.loads(x)["step"] >= 4 for x in log.read_text().splitlines())):
            time.sleep(0.1)
        (parted / "STOP").touch()

    watcher = threading.Thread(target=request_stop, daemon=True)
    watcher.start()
    first = _train(parted, tiny_model_dir, small_shards, port + 1, tuner)
    assert "stopped on request at step" in first
    stopped_at = max(int(p.name.split("-")[1]) for p in parted.glob("checkpoint-*"))
    assert 4 <= stopped_at < 10 and is_complete(parted / f"checkpoint-{stopped_at}")

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
