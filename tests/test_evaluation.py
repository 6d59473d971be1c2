"""Evaluation during a 2-rank ZeRO-3 run through SWIFT: validation losses per codebook every eval.steps,
and generated audio (boson's generation loop + the tiny codec) as WAV files and TensorBoard audio."""

import json
import os

import pytest
import soundfile as sf

from .conftest import torchrun_train


@pytest.mark.timeout(600)
def test_validation_losses_and_generated_audio_every_eval_steps(tmp_path, small_shards, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "train"
    torchrun_train(
        out,
        tiny_model_dir,
        small_shards,
        *("--max_steps", "6", "--save_steps", "6", "--data.batch_size", "2"),
        *("--eval.shards", json.dumps([str(small_shards)]), "--eval.steps", "3"),
        *("--eval.generate", "2", "--eval.codec", "tiny", "--eval.max_new_frames", "12"),
        port=29500 + (os.getpid() + 7) % 1000,
    )
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6]
    for h in evals:
        assert all(f"eval_audio_loss_cb{k}" in h and f"eval_audio_acc_cb{k}" in h for k in range(8))
        assert h["eval_text_loss"] > 0 and h["eval_audio_loss"] > 0
    # the same validation batches at both evaluations, a model trained 3 more steps on the same samples
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]

    for step in (3, 6):
        wavs = sorted((out / "eval_audio" / f"step-{step}").glob("*.wav"))
        assert len(wavs) == 2
        for wav in wavs:
            audio, rate = sf.read(wav)
            assert rate == 24000 and 0 < len(audio) <= 13 * 960 and (abs(audio) < 1e3).all()

    events = EventAccumulator(str(out / "logs"), size_guidance={"audio": 0}).Reload()
    tags = events.Tags()["audio"]
    assert len(tags) == 2 and all(t.startswith("eval_audio/") for t in tags)
    assert sorted(e.step for e in events.Audio(tags[0])) == [3, 6]
