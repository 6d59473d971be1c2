"""Voice metrics and judges: WER/CER and cosine against hand-worked values, the confidence interval's
properties, the audio measures on real speech (the demo corpus, espeak-ng) against noise and silence, and
the tiny random-weight judges (real Whisper, WavLM x-vector and wav2vec2 + UTMOS-style head classes) built,
loaded and run end to end, and refusing bad directories by name."""

import json
import math
import shutil

import numpy as np
import pytest

from higgs_ds.errors import UserError
from higgs_ds.eval import metrics as M

from .conftest import DEMO

SR = 16000


def demo_waves(ids, sr=SR):
    from higgs_ds.shards.audio import load_audio

    lines = [json.loads(line) for line in (DEMO / "manifest.jsonl").read_text().splitlines() if line.strip()]
    by_id = {line["misc"]["id"]: line for line in lines}
    out = []
    for i in ids:
        messages = by_id[i]["messages"]
        out.append((messages[1]["content"], load_audio(DEMO / messages[2]["content"]["audio_url"], sr)))
    return out


# the three speakers, FLAC 22.05 kHz, WAV 16 kHz and 44.1 kHz stereo
DEMO_IDS = ["alice_001", "bob_009", "carol_016"]


# ---------------------------------------------------------------------------------------------- text


def test_word_errors_count_substitutions_deletions_and_insertions():
    # sat->sit (substitution) and the second "the" dropped (deletion): 2 edits over 6 reference words
    c = M.word_errors("the cat sat on the mat", "the cat sit on mat")
    assert (c.errors, c.length) == (2, 6) and c.rate == pytest.approx(1 / 3)
    # two words appended: 2 insertions over 3
    assert M.word_errors("a b c", "a b c d e").rate == pytest.approx(2 / 3)
    # nothing heard: every reference word deleted
    assert M.word_errors("one two three four", "").rate == 1.0
    assert M.word_errors("same words here", "same words here").errors == 0


def test_char_errors_and_corpus_rate():
    # kitten -> sitting: k->s, e->i, +g = 3 edits over 6 characters
    assert M.char_errors("kitten", "sitting").rate == pytest.approx(0.5)
    # spaces count as characters: "ab cd" -> "abcd" is one deletion over 5
    assert M.char_errors("ab cd", "abcd").rate == pytest.approx(0.2)
    # the set's rate is the sum of edits over the sum of lengths (2/10), not the mean of rates (1/6)
    counts = [M.word_errors("the cat sat on the mat", "the cat sit on mat"), M.word_errors("w x y z", "w x y z")]
    assert M.corpus_rate(counts) == pytest.approx(0.2)


def test_normalisation_is_whispers():
    # case, punctuation and British spelling (with the checkpoint's spelling map) are not errors
    ref = M.normalize_text("The colour of the sky, Mr. Smith!", "en", {"colour": "color"})
    hyp = M.normalize_text("the color of the sky mister smith", "en-US", {"colour": "color"})
    assert M.word_errors(ref, hyp).errors == 0
    # without the map the spelling is one substitution over 7 words
    assert M.word_errors(M.normalize_text("the colour of the sky, Mr. Smith!"), hyp).errors == 1
    # Chinese is scored over characters: one wrong character of four
    assert M.normalize_text("你好，世界", "zh") == "你 好 世 界"
    assert M.word_errors(M.normalize_text("你好，世界", "zh"), M.normalize_text("你好世见", "zh")).rate == 0.25
    with pytest.raises(UserError, match="empty after normalisation"):
        M.word_errors(M.normalize_text("?!", "en"), "anything")


# ---------------------------------------------------------------------------------------------- sets


def test_cosine_similarity_by_hand():
    # (1,2,2).(2,0,1) = 4, |a| = 3, |b| = sqrt(5)
    assert float(M.cosine_similarity(np.array([1.0, 2, 2]), np.array([2.0, 0, 1]))) == pytest.approx(4 / (3 * 5**0.5))
    rows = M.cosine_similarity(np.array([[1.0, 0], [1, 1]]), np.array([[0.0, 3], [2, 2]]))
    assert rows == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="all zeros"):
        M.cosine_similarity(np.zeros(3), np.ones(3))


def test_bootstrap_interval_contains_the_value_narrows_with_n_and_repeats():
    rng = np.random.default_rng(1)
    small, large = rng.exponential(size=12), rng.exponential(size=1200)
    a, b = M.bootstrap_interval(small), M.bootstrap_interval(large)
    for values, iv in ((small, a), (large, b)):
        assert iv.value == pytest.approx(values.mean()) and iv.low < iv.value < iv.high and iv.n == len(values)
    assert (b.high - b.low) < (a.high - a.low) / 4  # ~1/sqrt(100) as wide
    assert M.bootstrap_interval(small) == a  # fixed seed: the same set gives the same interval
    const = M.bootstrap_interval([0.7] * 5)
    assert const.low == const.value == const.high == pytest.approx(0.7)


def test_summarize_per_language_with_corpus_wer():
    items = [
        M.ItemScores(language="en", wer=M.EditCounts(1, 4), sim=0.5),
        M.ItemScores(language="en-GB", wer=M.EditCounts(1, 6), sim=0.7),
        M.ItemScores(language="zh", wer=M.EditCounts(3, 10), sim=0.9, speaking_rate=math.inf),
    ]
    out = M.summarize(items)
    assert set(out) == {"all", "en", "zh"}
    assert out["all"]["wer"].value == pytest.approx(5 / 20) and out["en"]["wer"].value == pytest.approx(2 / 10)
    assert out["zh"]["wer"].value == pytest.approx(0.3) and out["en"]["sim"].value == pytest.approx(0.6)
    # an item without speech is counted, not dropped
    assert out["zh"]["speaking_rate"].without_speech == 1 and out["zh"]["speaking_rate"].n == 0
    assert "mos" not in out["all"]  # not measured: not reported
    assert set(M.summarize(items[:2])) == {"all"}  # one language: no per-language rows


# ---------------------------------------------------------------------------------------------- audio


def test_audio_measures_separate_speech_from_noise_and_silence():
    rng = np.random.default_rng(0)
    for text, wave in demo_waves(DEMO_IDS):
        seconds = M.speech_seconds(wave, SR)
        noise = rng.normal(0, 0.1, len(wave)).astype(np.float32)
        silence = np.zeros_like(wave)
        assert 1.5 < seconds <= len(wave) / SR
        # espeak-ng Harvard sentences: 8-12 syllables in ~2 s; noise and silence have no voiced nuclei
        assert 2.5 < M.syllable_rate(wave, SR) < 7.0
        assert M.syllable_rate(noise, SR) < 0.5 and M.syllable_rate(silence, SR) == 0.0
        assert 8 < M.speaking_rate(text, seconds) < 25
        assert M.speech_seconds(silence, SR) == 0.0 and M.speaking_rate(text, 0.0) == math.inf
        assert M.duration_ratio(seconds, seconds) == 1.0
        assert M.duration_ratio(M.speech_seconds(silence, SR), seconds) == 0.0
        assert M.duration_ratio(M.speech_seconds(wave[: len(wave) // 2], SR), seconds) < 0.6
        # the same speech played 1.5x faster (resampled): 1.5x the syllables per second
        faster = M.syllable_rate(wave[::3].repeat(2)[: len(wave) * 2 // 3], SR)
        assert faster > 1.25 * M.syllable_rate(wave, SR)
        # leading and trailing silence a model may pad with is not speech
        padded = np.concatenate([np.zeros(SR), wave, np.zeros(SR)])
        assert M.speech_seconds(padded, SR) == pytest.approx(seconds, abs=0.02)
    with pytest.raises(UserError, match="no speech"):
        M.duration_ratio(1.0, 0.0)


# ---------------------------------------------------------------------------------------------- judges


@pytest.fixture(scope="module")
def tiny_judges(tmp_path_factory):
    import torch

    from higgs_ds.eval.judges import load_judges
    from higgs_ds.eval.tiny_judges import write_tiny_judges

    torch.set_num_threads(2)
    dirs = write_tiny_judges(tmp_path_factory.mktemp("judges"))
    return dirs, load_judges(dirs["asr"], dirs["speaker"], dirs["mos"])


def _levenshtein(a: list, b: list) -> int:
    """Textbook edit distance, independent of jiwer."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_tiny_judges_run_end_to_end_on_demo_speech(tiny_judges):
    dirs, judges = tiny_judges
    items = demo_waves(DEMO_IDS, sr=24000)  # the TTS codec's rate: the judges resample to 16 kHz
    texts, waves = [t for t, _ in items], [w for _, w in items]
    asr = judges["asr"]
    transcripts = asr.transcribe(waves, 24000, language="en")
    assert len(transcripts) == 3 and all(isinstance(t, str) for t in transcripts)
    assert asr.spelling == {"colour": "color", "centre": "center"} and asr.languages == ["en", "zh"]
    for text, heard in zip(texts, transcripts):  # jiwer's count equals a hand-written edit distance
        ref, hyp = M.normalize_text(text, "en", asr.spelling), M.normalize_text(heard, "en", asr.spelling)
        assert M.word_errors(ref, hyp).errors == _levenshtein(ref.split(), hyp.split())
        assert M.char_errors(ref, hyp).errors == _levenshtein(list(ref), list(hyp))
    with pytest.raises(UserError, match="no language fr"):
        asr.transcribe(waves[:1], 24000, language="fr")

    emb = judges["speaker"].embed(waves, 24000)
    assert emb.shape == (3, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    one_by_one = np.concatenate([judges["speaker"].embed([w], 24000) for w in waves])
    np.testing.assert_allclose(emb, one_by_one, atol=1e-5)  # padding in a batch changes nothing
    sim = M.cosine_similarity(emb[0], emb[1])
    by_hand = sum(float(x) * float(y) for x, y in zip(emb[0], emb[1])) / math.sqrt(
        sum(float(x) ** 2 for x in emb[0]) * sum(float(y) ** 2 for y in emb[1])
    )
    assert float(sim) == pytest.approx(by_hand, rel=1e-9)

    mos = judges["mos"].score(waves, 24000)
    assert mos.shape == (3,) and mos.dtype == np.float32 and np.isfinite(mos).all()
    np.testing.assert_allclose(mos, np.concatenate([judges["mos"].score([w], 24000) for w in waves]), atol=1e-5)
    assert judges["mos"].score([np.zeros(100, np.float32)], 24000).shape == (1,)  # too short: padded, scored


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_judges_refuse_bad_directories_by_name(tiny_judges, tmp_path):
    from safetensors.torch import load_file, save_file

    from higgs_ds.eval.judges import AsrJudge, MosJudge, SpeakerJudge

    dirs, _ = tiny_judges
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'} is not a local directory.*never downloads"):
        AsrJudge(tmp_path / "nowhere")

    no_gen = _copy(dirs["asr"], tmp_path / "no_gen")
    (no_gen / "generation_config.json").unlink()
    with pytest.raises(UserError, match=f"{no_gen} has no generation_config.json"):
        AsrJudge(no_gen)

    pickled = _copy(dirs["speaker"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(
        UserError, match=f"{pickled} has no model.safetensors.*pytorch_model.bin: pickles.*convert it once"
    ):
        SpeakerJudge(pickled)

    with pytest.raises(UserError, match=f"{dirs['asr'] / 'config.json'} is a 'whisper' model"):
        SpeakerJudge(dirs["asr"])

    missing = _copy(dirs["speaker"], tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("tdnn"))[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, missing / "model.safetensors")
    with pytest.raises(UserError, match=f"{missing}: its weights are not WavLMForXVector's.*missing keys: {dropped}"):
        SpeakerJudge(missing)

    code = _copy(dirs["mos"], tmp_path / "code")
    (code / "modeling_mos.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(UserError, match="carries Python files"):
        MosJudge(code)

    headless = _copy(dirs["mos"], tmp_path / "headless")
    (headless / "mos_head.json").unlink()
    with pytest.raises(UserError, match=f"{headless} has no mos_head.json: the MOS judge is an SSL encoder"):
        MosJudge(headless)

    wrong_head = _copy(dirs["mos"], tmp_path / "wrong_head")
    spec = json.loads((wrong_head / "mos_head.json").read_text())
    (wrong_head / "mos_head.json").write_text(json.dumps(dict(spec, rnn_hidden=spec["rnn_hidden"] * 2)))
    with pytest.raises(UserError, match=f"{wrong_head / 'mos_head.safetensors'}: not MosHead's weights.*shape"):
        MosJudge(wrong_head)


def test_asr_transcribes_past_whispers_30_s_window_and_refuses_a_judge_without_timestamps(tiny_judges, tmp_path):
    from higgs_ds.eval.judges import AsrJudge

    dirs, judges = tiny_judges
    _, wave = demo_waves(DEMO_IDS[:1])[0]
    long_wave = np.tile(wave, int(np.ceil(35 * SR / len(wave))))[: 35 * SR]  # 35 s: long-form decoding
    (heard,) = judges["asr"].transcribe([long_wave], SR, language="en")
    assert isinstance(heard, str)
    assert "<|" not in heard  # timestamp tokens are not part of the transcript

    stampless = _copy(dirs["asr"], tmp_path / "stampless")
    config = json.loads((stampless / "generation_config.json").read_text())
    config.pop("no_timestamps_token_id", None)
    (stampless / "generation_config.json").write_text(json.dumps(config))
    judge = AsrJudge(stampless)
    assert judge.transcribe([wave], SR, language="en")  # within 30 s nothing changes
    with pytest.raises(UserError, match=f"35.0 s is longer than Whisper's 30 s window.*{stampless}.*timestamp"):
        judge.transcribe([long_wave], SR, language="en")


def test_score_waves_pairs_each_wave_with_its_text_reference_and_recording(tiny_judges):
    from higgs_ds.eval.scoring import score_waves

    dirs, judges = tiny_judges
    items = demo_waves(DEMO_IDS)
    texts, waves = [t for t, _ in items], [w for _, w in items]
    refs = [waves[2], waves[2], None]  # two items judged against one speaker reference, one against none
    seconds = [M.speech_seconds(w, SR) for w in waves]
    scored = score_waves(
        waves, SR, texts, ["en"] * 3, judges, speaker_refs=refs, target_seconds=[seconds[0], None, 2.0]
    )

    heard = judges["asr"].transcribe(waves, SR, language="en")  # the judges called directly: an independent path
    emb = judges["speaker"].embed(waves, SR)
    mos = judges["mos"].score(waves, SR)
    for i, item in enumerate(scored):
        ref = M.normalize_text(texts[i], "en", judges["asr"].spelling)
        hyp = M.normalize_text(heard[i], "en", judges["asr"].spelling)
        assert item.row["transcript"] == heard[i]
        assert item.scores.wer.errors == _levenshtein(ref.split(), hyp.split())
        assert item.scores.cer.errors == _levenshtein(list(ref), list(hyp))
        assert item.row["mos"] == pytest.approx(float(mos[i]), abs=1e-5)
        chars = len(ref.replace(" ", ""))
        assert item.row["speaking_rate"] == pytest.approx(chars / seconds[i])
    ref_emb = judges["speaker"].embed([waves[2]], SR)[0]  # the reference, embedded on its own (no batch padding)
    by_hand = float(emb[0] @ ref_emb / np.linalg.norm(emb[0]) / np.linalg.norm(ref_emb))
    assert scored[0].scores.sim == pytest.approx(by_hand, abs=1e-5)
    assert scored[2].scores.sim is None  # no reference: no SIM, not a made-up one
    assert scored[0].scores.duration_ratio == pytest.approx(1.0)  # its own recording
    assert scored[1].scores.duration_ratio is None and scored[2].scores.duration_ratio == pytest.approx(seconds[2] / 2)

    bare = score_waves(waves[:1], SR, texts[:1], ["en"], {})  # no judges: the audio measures alone
    assert bare[0].scores.wer is None and bare[0].scores.sim is None and bare[0].scores.mos is None
    assert bare[0].scores.speaking_rate == pytest.approx(scored[0].scores.speaking_rate)
    noise = np.random.default_rng(0).standard_normal(len(waves[0])).astype(np.float32) * 0.1
    (loud,) = score_waves([noise], SR, texts[:1], ["en"], {})
    assert loud.scores.syllable_rate < 0.5 * scored[0].scores.syllable_rate  # noise has no syllables


def test_a_dialogues_speaker_tags_are_not_judged_as_words():
    from higgs_ds.eval.scoring import score_waves, spoken_text

    assert spoken_text("[SPEAKER0] Hi there. [SPEAKER1] Hello!") == "Hi there. Hello!"

    class Heard:  # an ASR judge that hears exactly the spoken words
        spelling = None

        def transcribe(self, waves, sr, language=None):
            return ["hi there hello"] * len(waves)

    wave = demo_waves(DEMO_IDS[:1])[0][1]
    (item,) = score_waves([wave], SR, ["[SPEAKER0] Hi there. [SPEAKER1] Hello!"], ["en"], {"asr": Heard()})
    assert (item.scores.wer.errors, item.scores.wer.length) == (0, 3)
    seconds = M.speech_seconds(wave, SR)
    assert item.row["speaking_rate"] == pytest.approx(len("hitherehello") / seconds)
