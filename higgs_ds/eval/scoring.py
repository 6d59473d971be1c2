"""Waves of one system (a model, or the reference recordings themselves) -> per-item scores and rows.

The judges listen (higgs_ds.eval.judges), the metrics count (higgs_ds.eval.metrics); this module pairs each
generated wave with what it is judged against:

* WER/CER: the ASR transcript of the wave against the item's text, both normalised for the item's language;
* SIM: the cosine between the wave's speaker embedding and the speaker's reference recording's (the cloning
  prompt's audio, or another recording of the speaker): the reference is embedded once per distinct array;
* MOS: the predictor's score of the wave alone;
* speaking rate (normalised characters per second of speech), syllable rate (from the audio alone), and the
  duration ratio against the recording of this very text when the set has one.

A metric whose judge or reference is missing stays None (the table leaves it out), never a made-up number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from higgs_ds.eval import metrics as M

SPEAKER_TAG = re.compile(r"\[SPEAKER\d+\]")


@dataclass
class ScoredItem:
    """One item's numbers (metrics.ItemScores) and the row a person reads (transcript, values)."""

    scores: M.ItemScores
    row: dict


def score_waves(
    waves: list[np.ndarray],
    sr: int,
    texts: list[str],
    languages: list[str | None],
    judges: dict,
    speaker_refs: list[np.ndarray | None] | None = None,
    target_seconds: list[float | None] | None = None,
) -> list[ScoredItem]:
    """Score every wave; the lists run in parallel (one entry per item)."""
    n = len(waves)
    if not (len(texts) == len(languages) == n):
        raise ValueError(f"score_waves: {n} waves, {len(texts)} texts, {len(languages)} languages")
    speaker_refs = speaker_refs or [None] * n
    target_seconds = target_seconds or [None] * n
    transcripts = _transcripts(waves, sr, languages, judges.get("asr"))
    sims = _similarities(waves, sr, speaker_refs, judges.get("speaker"))
    mos = judges["mos"].score(waves, sr) if "mos" in judges and n else [None] * n
    spelling = getattr(judges.get("asr"), "spelling", None)
    return [
        _item(waves[i], sr, texts[i], languages[i], transcripts[i], sims[i], mos[i], target_seconds[i], spelling)
        for i in range(n)
    ]


def _transcripts(waves, sr, languages, asr) -> list[str | None]:
    if asr is None or not waves:
        return [None] * len(waves)
    if len({lang or "" for lang in languages}) == 1:  # one language: Whisper gets it as one setting
        return asr.transcribe(waves, sr, language=languages[0])
    return asr.transcribe(waves, sr, language=[lang or "en" for lang in languages])


def _similarities(waves, sr, refs, speaker) -> list[float | None]:
    if speaker is None or not waves:
        return [None] * len(waves)
    generated = speaker.embed(waves, sr)
    distinct: dict[int, int] = {}  # id(reference array) -> its row: a speaker's reference embedded once
    unique = []
    for ref in refs:
        if ref is not None and id(ref) not in distinct:
            distinct[id(ref)] = len(unique)
            unique.append(ref)
    embedded = speaker.embed(unique, sr) if unique else np.zeros((0, generated.shape[1]), np.float32)
    out = []
    for row, ref in zip(generated, refs):
        out.append(None if ref is None else float(M.cosine_similarity(row, embedded[distinct[id(ref)]])))
    return out


def spoken_text(text: str) -> str:
    """What is said: a dialogue's [SPEAKERn] tags name the voice and are not spoken (nor judged)."""
    return " ".join(SPEAKER_TAG.sub(" ", text).split())


def _item(wave, sr, text, language, transcript, sim, mos, target_seconds, spelling) -> ScoredItem:
    seconds = M.speech_seconds(wave, sr)
    said = spoken_text(text)
    scores = M.ItemScores(
        language=language,
        sim=sim,
        mos=None if mos is None else float(mos),
        speaking_rate=M.speaking_rate(said, seconds, language),
        syllable_rate=M.syllable_rate(wave, sr),
        duration_ratio=M.duration_ratio(seconds, target_seconds) if target_seconds else None,
    )
    if transcript is not None:
        ref, hyp = M.normalize_text(said, language, spelling), M.normalize_text(transcript, language, spelling)
        scores.wer, scores.cer = M.word_errors(ref, hyp), M.char_errors(ref, hyp)
    row = {
        "text": text,
        "language": language,
        "transcript": transcript,
        "wer": None if scores.wer is None else scores.wer.rate,
        "cer": None if scores.cer is None else scores.cer.rate,
        "sim": sim,
        "mos": scores.mos,
        "speech_seconds": seconds,
        "speaking_rate": scores.speaking_rate,
        "syllable_rate": scores.syllable_rate,
        "duration_ratio": scores.duration_ratio,
    }
    return ScoredItem(scores, row)
