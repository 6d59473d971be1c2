"""Stage 2 of the data flow: an audio file -> a mono float32 waveform at the codec's rate (24 kHz).

libsndfile (through soundfile) reads wav, flac, ogg/vorbis/opus and mp3; anything it cannot open is
tried once more through librosa's audioread/ffmpeg backend. Resampling is soxr's high-quality mode.
Every failure raises AudioError with a reason a person can act on; the shard builder records it.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from higgs_ds.errors import UserError


class AudioError(UserError):
    """This audio file cannot be used; str(err) is the reason written to the rejects file."""


def _decode(path: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        return data.mean(axis=1), int(sr)
    except (sf.LibsndfileError, RuntimeError) as sf_err:
        first_error = sf_err
    try:  # formats libsndfile lacks (m4a, wma, ...), through audioread/ffmpeg
        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, sr = librosa.load(path, sr=None, mono=True)
        return data.astype(np.float32), int(sr)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a property of this file
        raise AudioError(f"cannot decode audio ({first_error}; fallback decoder: {type(err).__name__})") from err


def load_audio(path: str | os.PathLike, target_sr: int) -> np.ndarray:
    """Decode, downmix to mono and resample; raises AudioError for missing, empty or broken files."""
    import soxr

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioError(f"audio path is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    wave, sr = _decode(path)
    if wave.size == 0:
        raise AudioError(f"audio has no samples: {path}")
    if not np.isfinite(wave).all():
        raise AudioError(f"audio contains NaN or infinite samples: {path}")
    if sr != target_sr:
        wave = soxr.resample(wave, sr, target_sr, quality="HQ").astype(np.float32)
    return wave
