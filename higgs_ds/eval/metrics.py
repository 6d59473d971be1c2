"""The numbers that say whether a voice got better: intelligibility (WER/CER), speaker similarity, speaking
rate, duration, each with a confidence interval over the set, per language where items carry one.

- Text is normalised as Whisper's evaluation does (transformers' `EnglishTextNormalizer` for English, with the
  ASR checkpoint's British->American spelling map when it ships one, `normalizer.json`; `BasicTextNormalizer`
  for other languages). Languages written without spaces (zh, ja, yue, th, lo, my, km) are split into
  characters first, so their "WER" is over characters, as Seed-TTS-eval scores Chinese.
- WER/CER are counted with `jiwer` (Levenshtein alignment): an item's errors (substitutions + deletions +
  insertions) and reference length; a set's WER is the sum of errors over the sum of reference words (the
  corpus WER every paper reports), not the mean of per-item rates. CER uses the normalised text with its
  single spaces, as jiwer counts it.
- Speaker similarity is the cosine of two speaker-verification embeddings (Seed-TTS-eval's SIM).
- Speaking rate: characters (normalised text, spaces left out) per second of speech, where speech is the
  audio between its first and last non-silent frame. `syllable_rate` is the audio's own rate, independent of
  any text: voiced intensity peaks (syllable nuclei, after de Jong & Wempe 2009) per second of speech, so
  babble, noise and silence show up even when the transcript is not trusted. Duration ratio: generated
  speech seconds over the reference's.

Nothing here loads a model; the judges (higgs_ds.eval.judges) make the transcripts, embeddings and scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from higgs_ds.errors import UserError

# Written without spaces between words: WER over characters, as Seed-TTS-eval does for Chinese.
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "yue", "th", "lo", "my", "km"})
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
FRAME_SECONDS = 0.025  # analysis frames of the audio measures: 25 ms every 10 ms, the usual speech frames
HOP_SECONDS = 0.010
SILENCE_DB = 40.0  # a frame this far below the loudest frame is silence
ABSOLUTE_FLOOR = 1e-4  # RMS (-80 dBFS): quieter frames are silence even in an all-quiet file


# ---------------------------------------------------------------------------------------------- text


@lru_cache(maxsize=8)
def _english(spelling: tuple) -> Callable[[str], str]:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(dict(spelling))


@lru_cache(maxsize=2)
def _basic(split_letters: bool) -> Callable[[str], str]:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer(split_letters=split_letters)


def base_language(language: str | None) -> str:
    """'en-US' / 'EN' / 'en_gb' -> 'en'; None or '' -> 'en' (the English normaliser is Whisper's default)."""
    return (language or "en").replace("_", "-").split("-")[0].lower()


def normalize_text(text: str, language: str | None = "en", spelling: Mapping[str, str] | None = None) -> str:
    """Whisper's evaluation normalisation of `text` for `language`; `spelling` is the ASR checkpoint's
    British->American map (Whisper's normalizer.json), used for English only."""
    lang = base_language(language)
    if lang == "en":
        out = _english(tuple(sorted((spelling or {}).items())))(text)
    else:
        out = _basic(lang in CHARACTER_LANGUAGES)(text)
    return " ".join(out.split())


@dataclass(frozen=True)
class EditCounts:
    """One item's (or a set's) edit distance: errors = substitutions + deletions + insertions."""

    errors: int
    length: int  # reference words (WER) or characters (CER)

    @property
    def rate(self) -> float:
        return self.errors / self.length


def _counts(output, length: int) -> EditCounts:
    return EditCounts(output.substitutions + output.deletions + output.insertions, length)


def word_errors(reference: str, hypothesis: str) -> EditCounts:
    """Word edits between two already-normalised strings; an empty reference is refused (WER undefined)."""
    import jiwer

    words = len(reference.split())
    if words == 0:
        raise UserError(f"reference text {reference!r} is empty after normalisation: WER is undefined for it")
    if not hypothesis.strip():
        return EditCounts(words, words)  # all deleted (jiwer refuses an empty hypothesis string in a list)
    return _counts(jiwer.process_words(reference, hypothesis), words)


def char_errors(reference: str, hypothesis: str) -> EditCounts:
    """Character edits (spaces included, as jiwer counts them) between two already-normalised strings."""
    import jiwer

    chars = len(reference)
    if chars == 0:
        raise UserError(f"reference text {reference!r} is empty after normalisation: CER is undefined for it")
    if not hypothesis:
        return EditCounts(chars, chars)
    return _counts(jiwer.process_characters(reference, hypothesis), chars)


def corpus_rate(counts: Iterable[EditCounts]) -> float:
    """Sum of errors over sum of reference lengths (the set's WER or CER)."""
    counts = list(counts)
    return sum(c.errors for c in counts) / sum(c.length for c in counts)


# ---------------------------------------------------------------------------------------------- speaker


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) embedding arrays (or two (d,) vectors -> a 0-d array)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[-1] == 0:
        raise ValueError(f"cosine_similarity needs two equal (n, d) or (d,) arrays, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    if np.any(norms == 0):
        raise ValueError("cosine_similarity: an embedding is all zeros (no direction)")
    return np.sum(a * b, axis=-1) / norms


# ---------------------------------------------------------------------------------------------- audio


def _frames(wave: np.ndarray, sr: int) -> np.ndarray:
    """(frames, frame_len) view of a mono wave (a short wave is one zero-padded frame)."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    size, hop = max(1, round(FRAME_SECONDS * sr)), max(1, round(HOP_SECONDS * sr))
    if len(wave) < size:
        wave = np.pad(wave, (0, size - len(wave)))
    return np.lib.stride_tricks.sliding_window_view(wave, size)[::hop]


def _loud(frames: np.ndarray) -> np.ndarray:
    rms = np.sqrt(np.mean(frames**2, axis=1))
    threshold = max(rms.max() * 10 ** (-SILENCE_DB / 20), ABSOLUTE_FLOOR)
    return rms >= threshold


def speech_seconds(wave: np.ndarray, sr: int) -> float:
    """Seconds from the first to the last non-silent frame (0.0 for silence): leading and trailing silence,
    which a TTS model may pad freely, does not count."""
    loud = np.flatnonzero(_loud(_frames(wave, sr)))
    if loud.size == 0:
        return 0.0
    return float((loud[-1] - loud[0]) * HOP_SECONDS + FRAME_SECONDS)


def _voiced(frames: np.ndarray, sr: int, threshold: float = 0.6) -> np.ndarray:
    """Frames with a pitch: the normalised autocorrelation (unbiased for the lag) peaks above `threshold` at
    a lag of 2.5-13 ms (75-400 Hz). White noise stays near 0, voiced speech near 1."""
    x = frames - frames.mean(axis=1, keepdims=True)
    n = x.shape[1]
    lo, hi = int(sr / 400), min(int(sr / 75), n // 2)
    if hi <= lo:
        return np.zeros(len(frames), dtype=bool)
    spec = np.fft.rfft(x, 2 * n, axis=1)
    ac = np.fft.irfft(spec * np.conj(spec), axis=1)[:, : hi + 1]
    lags = np.arange(lo, hi + 1)
    unbiased = ac[:, lo : hi + 1] * (n / (n - lags))
    energy = ac[:, 0]
    return unbiased.max(axis=1) > threshold * np.where(energy > 0, energy, np.inf)


def syllable_rate(wave: np.ndarray, sr: int, min_dip_db: float = 2.0) -> float:
    """Syllable nuclei per second of speech: peaks of the (50 ms smoothed) frame intensity that are voiced,
    not silent, and stand at least `min_dip_db` above the dip before them. 0.0 for silence or noise."""
    frames = _frames(wave, sr)
    seconds = speech_seconds(wave, sr)
    if seconds == 0.0:
        return 0.0
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    db = np.convolve(db, np.ones(5) / 5, mode="same")
    ok = _loud(frames) & _voiced(frames, sr)
    peaks, dip = 0, db[0]
    for i in range(1, len(db) - 1):
        dip = min(dip, db[i])
        if db[i] >= db[i - 1] and db[i] > db[i + 1] and ok[i] and db[i] - dip >= min_dip_db:
            peaks, dip = peaks + 1, db[i]
    return peaks / seconds


def speaking_rate(text: str, seconds: float, language: str | None = "en") -> float:
    """Characters of the normalised text (spaces left out) per second of speech; inf for no speech."""
    chars = len(normalize_text(text, language).replace(" ", ""))
    return chars / seconds if seconds > 0 else math.inf


def duration_ratio(generated_seconds: float, reference_seconds: float) -> float:
    """Generated speech seconds over the reference's (1.0 = the same length)."""
    if reference_seconds <= 0:
        raise UserError("duration_ratio: the reference has no speech (0 s): pick another reference recording")
    return generated_seconds / reference_seconds


# ---------------------------------------------------------------------------------------------- sets


@dataclass(frozen=True)
class Interval:
    """A statistic over a set with its 95% bootstrap interval."""

    value: float
    low: float
    high: float
    n: int
    without_speech: int = 0  # items left out of a rate because they had no speech (rate infinite): counted

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("value", "low", "high", "n", "without_speech")}


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """Percentile bootstrap over the items (rows of `values`), fixed seed: the same set gives the same interval.

    Why bootstrap and not a t-interval: per-item WER is bounded below by 0, mostly 0 with a long tail, and SIM
    and MOS are bounded, so the mean's sampling distribution on the tens-to-hundreds of items of an eval set is
    skewed; and the set's WER is a ratio of sums (errors / words), which a t-interval on per-item rates does not
    describe. Resampling items and recomputing the statistic handles both. `statistic` (default the mean) gets
    an array of resampled rows; for WER pass rows (errors, words) and `lambda r: r[:, 0].sum() / r[:, 1].sum()`.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.shape[0] == 0:
        raise ValueError("bootstrap_interval: no values")
    stat = statistic or (lambda rows: float(np.mean(rows)))
    value = float(stat(data))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    draws = np.array([stat(data[p]) for p in picks])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(value, float(min(low, value)), float(max(high, value)), len(data))


def _ratio(rows: np.ndarray) -> float:
    return float(rows[:, 0].sum() / rows[:, 1].sum())


METRICS = ("wer", "cer", "sim", "mos", "speaking_rate", "syllable_rate", "duration_ratio")


@dataclass
class ItemScores:
    """One evaluated item; a metric the run did not measure stays None."""

    language: str | None = None
    wer: EditCounts | None = None
    cer: EditCounts | None = None
    sim: float | None = None
    mos: float | None = None
    speaking_rate: float | None = None
    syllable_rate: float | None = None
    duration_ratio: float | None = None


def _interval(items: list[ItemScores], metric: str) -> Interval | None:
    present = [getattr(i, metric) for i in items if getattr(i, metric) is not None]
    if not present:
        return None
    if metric in ("wer", "cer"):
        return bootstrap_interval([(c.errors, c.length) for c in present], _ratio)
    finite = [v for v in present if math.isfinite(v)]
    if not finite:
        return Interval(math.nan, math.nan, math.nan, 0, len(present))
    interval = bootstrap_interval(finite)
    return replace(interval, without_speech=len(present) - len(finite))


def summarize(items: Sequence[ItemScores]) -> dict[str, dict[str, Interval]]:
    """{"all": {metric: Interval}, LANGUAGE: {...}} over the metrics the items carry; a language group is
    added for each language the items name (only when they name more than one, "all" says the rest)."""
    groups = {"all": list(items)}
    languages = sorted({base_language(i.language) for i in items if i.language})
    if len(languages) > 1:
        for lang in languages:
            groups[lang] = [i for i in items if i.language and base_language(i.language) == lang]
    out = {}
    for name, members in groups.items():
        row = {m: _interval(members, m) for m in METRICS}
        out[name] = {m: v for m, v in row.items() if v is not None}
    return out
