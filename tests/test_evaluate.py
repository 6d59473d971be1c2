"""`higgs-ds evaluate` end to end on tiny models (the real classes, random weights), the tiny codec and the
tiny judges: every system's audio is what a direct generate_codes call gives for the same prompt and seed,
the reference system is the held-out recordings through the codec, and the table's numbers equal those
computed here from the judges' own outputs (edit distance by hand, corpus WER, cosine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_voice_metrics import _levenshtein

pytestmark = pytest.mark.timeout(600)
FRAMES = 12


@pytest.fixture(scope="module")
def judged(tmp_path_factory, tiny_model_dir, small_shards):
    from higgs_ds.eval.evaluate import evaluate
    from higgs_ds.eval.judges import load_judges
    from higgs_ds.eval.synthesize import Sampling
    from higgs_ds.eval.tiny_judges import write_tiny_judges
    from higgs_ds.models.tiny import write_tiny

    root = tmp_path_factory.mktemp("evaluate")
    dirs = write_tiny_judges(root / "judges")
    judges = load_judges(dirs["asr"], dirs["speaker"], dirs["mos"])
    other = write_tiny(root / "other-model", seed=1)  # another "checkpoint": other weights, same shapes
    out = root / "out"
    report = evaluate(
        [str(tiny_model_dir), str(other)],
        [str(small_shards)],
        str(out),
        base=str(tiny_model_dir),
        judges=judges,
        codec_spec="tiny",
        sampling=Sampling(temperature=0.7, max_new_frames=FRAMES),
        limit=None,
        seed=5,
        say=lambda *_: None,
    )
    return report, out, judges, other


def test_every_system_is_judged_on_the_same_items(judged, tiny_model_dir):
    report, out, _, other = judged
    names = [s["name"] for s in report["systems"]]
    assert names == ["reference", tiny_model_dir.name, other.name, "base"]
    assert report["set"]["items"] == 8
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 4  # every held-out item has its recording: the reference system judges all 8
    for system in names:
        ids = [r["id"] for r in rows if r["system"] == system]
        assert len(ids) == 8 and len(set(ids)) == 8
        assert all((out / system / f"{i}.wav").is_file() for i in ids)
    table = (out / "evaluation.md").read_text()
    assert all(f"| {n} (" in table for n in names) and (out / "evaluation.png").stat().st_size > 1000


def test_generated_audio_is_generate_codes_on_the_items_prompts(judged, tiny_model_dir, small_shards, tiny_codec):
    import soundfile as sf
    from transformers import AutoTokenizer

    from higgs_ds.eval.generate import decode, generate_codes
    from higgs_ds.eval.synthesize import checked_model_dir, load_model, torch_dtype
    from higgs_ds.eval.validation import prompt_records

    _, out, _, _ = judged
    path, family = checked_model_dir(tiny_model_dir)
    model = load_model(path, family, torch_dtype("float32", "cpu"), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for k, record in enumerate(prompt_records([str(small_shards)], 8)):
        codes = generate_codes(model, tokenizer, record, max_new_frames=FRAMES, seed=5 + k, temperature=0.7)
        wave, rate = sf.read(out / tiny_model_dir.name / f"{record['json']['id']}.wav", dtype="float32")
        assert rate == tiny_codec.provenance["sample_rate"]
        np.testing.assert_array_equal(wave, decode(tiny_codec, codes))
        # the base is the same directory, prompted the same way: the same audio
        base, _ = sf.read(out / "base" / f"{record['json']['id']}.wav", dtype="float32")
        np.testing.assert_array_equal(base, wave)


def test_the_numbers_are_the_judges_outputs_counted_by_hand(judged):
    import soundfile as sf

    from higgs_ds.eval import metrics as M

    report, out, judges, other = judged
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for system in report["systems"]:
        mine = [r for r in rows if r["system"] == system["name"]]
        waves = [sf.read(r["wav"], dtype="float32")[0] for r in mine]
        heard = judges["asr"].transcribe(waves, 24000, language="en")
        errors = words = 0
        for row, text in zip(mine, heard):
            ref = M.normalize_text(row["text"], "en", judges["asr"].spelling).split()
            hyp = M.normalize_text(text, "en", judges["asr"].spelling).split()
            assert row["transcript"] == text
            errors, words = errors + _levenshtein(ref, hyp), words + len(ref)
        summary = system["summary"]["all"]
        assert summary["wer"]["value"] == pytest.approx(errors / words)  # corpus WER: sum of edits / words
        assert summary["wer"]["low"] <= summary["wer"]["value"] <= summary["wer"]["high"]
        mos = judges["mos"].score(waves, 24000)
        assert summary["mos"]["value"] == pytest.approx(float(np.mean(mos)), abs=1e-5)
        if system["name"] == "reference":  # SIM only for the cloning items, against their prompt's voice
            assert [r["sim"] is None for r in mine] == ["clone" not in r["id"] for r in mine]
            assert sum(r["sim"] is not None for r in mine) == 2  # the two cloning samples of the set
            assert [r["duration_ratio"] for r in mine] == [1.0] * len(mine)
        else:
            assert all(r["sim"] is not None and -1 <= r["sim"] <= 1 for r in mine)
    model, ref = report["systems"][1]["summary"]["all"], report["systems"][0]["summary"]["all"]
    assert model["speaking_rate"]["value"] != pytest.approx(ref["speaking_rate"]["value"])  # not a constant
