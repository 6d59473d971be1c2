"""Stage 2 of the data flow: an audio file -> a mono float32 waveform at the codec's rate (24 kHz).

libsndfile (through soundfile) reads wav, flac, ogg/vorbis/opus and mp3, at any rate and channel count;
anything it cannot open is tried once more through librosa's audioread/ffmpeg backend. Resampling is
soxr's high-quality mode. Every failure raises AudioError with a reason a person can act on; the shard
builder records it. Silence is valid audio (pauses, breaths) and is accepted; NaN or infinite samples,
truncated files and clips shorter than `min_seconds` are not.
"""

from __future__ import annotations

import os
import re
import stat
import warnings

import numpy as np

from higgs_ds.errors import UserError

# libsndfile logs "data : CLAIMED (should be PRESENT)" when a WAV header announces more audio than the
# file holds; it then quietly reads what is there, so the cut would go unnoticed.
_WAV_DATA_CLAIM = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZE = 0x7FFF0000  # pipes write a placeholder size this large or larger: unknown, not truncated
_UNKNOWN_FRAMES = 1 << 62  # libsndfile's "length unknown"


class AudioError(UserError):
    """This audio file cannot be used; str(err) is the reason written to the rejects file."""


def _check_file(path: str) -> None:
    """A regular, non-empty, readable file; never open a FIFO or device (that would block or never end)."""
    if "\0" in path:
        raise AudioError(f"audio path contains a NUL character: {path!r}")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise AudioError(f"audio file not found: {path}") from None
    except PermissionError:
        raise AudioError(f"audio file cannot be read (permission denied; check its permissions): {path}") from None
    except OSError as err:
        raise AudioError(f"audio file cannot be opened ({err.strerror}): {path}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(f"audio path is a directory, not a file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(f"audio path is not a regular file (a FIFO, socket or device): {path}")
    if st.st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    if not os.access(path, os.R_OK):
        raise AudioError(f"audio file cannot be read (permission denied; check its permissions): {path}")


def _over_long(seconds: float, max_seconds: float, path: str) -> AudioError:
    return AudioError(f"audio is {seconds:.1f} s, over --max-seconds {max_seconds:g} (cut it shorter): {path}")


def _truncated(detail: str, path: str) -> AudioError:
    return AudioError(f"audio file is truncated ({detail}; copy or export it again): {path}")


def _read_sndfile(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(path) as f:
        sr, announced = int(f.samplerate), int(f.frames)
        known = 0 < announced < _UNKNOWN_FRAMES
        if max_seconds is not None and known and announced / sr > max_seconds + 1.0:
            raise _over_long(announced / sr, max_seconds, path)  # decided from the header: no decoding
        claim = _WAV_DATA_CLAIM.search(f.extra_info)
        if claim and _STREAMING_SIZE > int(claim[1]) > int(claim[2]):
            raise _truncated(f"the header announces {claim[1]} bytes of audio, only {claim[2]} are there", path)
        # a hostile file may not announce its length: never decode more than max_seconds + 1 s of it
        limit = -1 if max_seconds is None else int((max_seconds + 1.0) * sr) + 1
        data = f.read(limit, dtype="float32", always_2d=True)
    if limit > 0 and len(data) == limit:
        raise _over_long(max(announced if known else 0, limit) / sr, max_seconds, path)
    if known and len(data) < announced * 0.98 - 2304:  # an mp3 decoder stops early on a cut stream (2 frames slack)
        raise _truncated(f"{announced / sr:.2f} s announced, {len(data) / sr:.2f} s decodable", path)
    return data.mean(axis=1), sr


def _decode(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    try:
        return _read_sndfile(path, max_seconds)
    except AudioError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is a property of this file
        # _check_file has seen a regular file: libsndfile says "does not exist" of headers it cannot parse
        first_error = str(err).replace(f"Error opening {path!r}: ", "")
        first_error = first_error.replace(
            "File does not exist or is not a regular file (possibly a pipe?).", "bad header"
        )
    try:  # formats libsndfile lacks (m4a, wma, ...), through audioread/ffmpeg
        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, sr = librosa.load(path, sr=None, mono=True, duration=None)
        return data.astype(np.float32), int(sr)
    except Exception as err:  # noqa: BLE001
        fallback = "not installed" if type(err).__name__ == "NoBackendError" else f"{type(err).__name__}: {err}"
        raise AudioError(
            f"cannot decode audio: corrupt, truncated or not an audio format we read (libsndfile: {first_error}; "
            f"ffmpeg fallback: {fallback}); re-encode it as WAV or FLAC: {path}"
        ) from None


def load_audio(
    path: str | os.PathLike, target_sr: int, *, max_seconds: float | None = None, min_seconds: float = 0.0
) -> np.ndarray:
    """Decode, downmix to mono and resample; raises AudioError naming the problem with the file."""
    import soxr

    path = os.fspath(path)
    _check_file(path)
    wave, sr = _decode(path, max_seconds)
    if wave.size == 0:
        raise AudioError(f"audio has no samples (0 s long): {path}")
    if not np.isfinite(wave).all():
        raise AudioError(f"audio contains NaN or infinite samples (a broken float WAV?): {path}")
    seconds = len(wave) / sr
    if max_seconds is not None and seconds > max_seconds:
        raise _over_long(seconds, max_seconds, path)
    if sr != target_sr:
        wave = soxr.resample(wave, sr, target_sr, quality="HQ").astype(np.float32)
    if len(wave) < min_seconds * target_sr:  # after resampling: the codec sees these samples
        raise AudioError(f"audio is {seconds:.3f} s, shorter than the minimum {min_seconds:.3f} s: {path}")
    return wave
