"""Evaluation during a 2-rank ZeRO-3 run through SWIFT: validation losses per codebook every eval.steps,
generated audio (the family's generation loop + the tiny codec) as WAV files and TensorBoard audio, judged by
tiny random-weight judges (eval_wer, eval_sim, eval_mos, ...) and the best checkpoint kept by eval_mos."""

import json
import os

import pytest
import soundfile as sf

from .conftest import torchrun_train


@pytest.mark.timeout(600)
def test_validation_losses_and_generated_audio_every_eval_steps(tmp_path, small_shards, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from higgs_ds.eval.tiny_judges import write_tiny_judges

    judges = write_tiny_judges(tmp_path / "judges")
    out = tmp_path / "train"
    torchrun_train(
        out,
        tiny_model_dir,
        small_shards,
        *("--max_steps", "6", "--save_steps", "3", "--data.batch_size", "2"),
        *("--eval.shards", json.dumps([str(small_shards)]), "--eval.steps", "3"),
        *("--eval.generate", "2", "--eval.codec", "tiny", "--eval.max_new_frames", "12"),
        *(f"--eval.{kind}={path}" for kind, path in judges.items()),
        "--eval.select=mos",
        port=29500 + (os.getpid() + 7) % 1000,
    )
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    history = state["log_history"]
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

    # the judged metrics are the tiny judges' own numbers on the WAVs written at that step (rank 0's)
    from higgs_ds.eval import metrics as M
    from higgs_ds.eval.judges import load_judges

    from .test_voice_metrics import _levenshtein

    judged = load_judges(judges["asr"], judges["speaker"], judges["mos"])
    voiced = {h["step"]: h for h in history if "eval_mos" in h}
    assert sorted(voiced) == [3, 6]
    texts = _prompt_texts(small_shards, tiny_model_dir)
    for step, h in voiced.items():
        assert {"eval_wer", "eval_cer", "eval_sim", "eval_speaking_rate", "eval_duration_ratio"} <= set(h)
        waves = [sf.read(w, dtype="float32")[0] for w in sorted((out / "eval_audio" / f"step-{step}").glob("*.wav"))]
        names = sorted(w.stem for w in (out / "eval_audio" / f"step-{step}").glob("*.wav"))
        assert h["eval_mos"] == pytest.approx(float(judged["mos"].score(waves, 24000).mean()), abs=1e-4)
        heard = judged["asr"].transcribe(waves, 24000, language="en")
        edits = words = 0
        for name, text in zip(names, heard):
            ref = M.normalize_text(texts[name], "en", judged["asr"].spelling).split()
            edits += _levenshtein(ref, M.normalize_text(text, "en", judged["asr"].spelling).split())
            words += len(ref)
        assert h["eval_wer"] == pytest.approx(edits / words)
    best = max(voiced, key=lambda step: voiced[step]["eval_mos"])
    assert state["best_metric"] == pytest.approx(voiced[best]["eval_mos"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}")


def _prompt_texts(shards, tokenizer_dir) -> dict[str, str]:
    from transformers import AutoTokenizer

    from higgs_ds.eval.generate import prompt_from_record
    from higgs_ds.eval.validation import prompt_records

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {r["json"]["id"]: prompt_from_record(r, tokenizer).text for r in prompt_records([str(shards)], 2)}


@pytest.mark.native_env
def test_a_warning_when_a_judged_metric_worsens_while_the_loss_improves():
    from higgs_ds.train.swift.trainer import warn_if_worse

    falling_loss = [{"eval_loss": 3.0 - i, "eval_wer": 0.1 + 0.1 * i, "eval_sim": 0.8} for i in range(4)]
    (warning,) = warn_if_worse(falling_loss, 3)  # WER up 3 times in a row, the loss down: said; SIM flat: not
    assert warning.startswith("eval_wer got worse at each of the last 3 evaluations (0.1 -> 0.4)")
    assert warn_if_worse(falling_loss[:3], 3) == []  # not yet 3 evaluations of worsening
    assert warn_if_worse(falling_loss, 0) == []  # off
    sim_down = [dict(h, eval_wer=0.1, eval_sim=0.9 - 0.1 * i) for i, h in enumerate(falling_loss)]
    assert [w.split()[0] for w in warn_if_worse(sim_down, 2)] == ["eval_sim"]  # higher is better for SIM
    rising_loss = [dict(h, eval_loss=float(i)) for i, h in enumerate(falling_loss)]
    assert warn_if_worse(rising_loss, 3) == []  # the loss says it too: nothing hidden
