"""Stage 2 of the data flow: an audio file -> a mono float32 waveform at the codec's rate (24 kHz).

libsndfile (through soundfile) reads wav, flac, ogg/vorbis/opus and mp3, at any rate and channel count;
anything it cannot open is tried once more through audioread (the standard library's wave/aifc/sunau
readers, and ffmpeg where it is installed). Both decode block by block into mono and stop at
max_seconds + 1 s, so no file, whatever its header says, holds more than that in memory. Resampling is
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
_MAX_RATE = 768_000  # the highest rate audio interfaces record; a header beyond it is broken or hostile
_BLOCK_SAMPLES = 1 << 20  # samples (frames x channels) decoded at a time: 4 MiB of float32


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


class _Bounded:
    """Collects a decoder's blocks as mono float32 and stops once the file proves longer than the limit.

    Both decoders go through here, so neither ever holds more than max_seconds + 1 s of mono audio (plus one
    block), whatever the file announces: a small file that decodes to hours (a hostile header, a stream
    without a length, a sparse file) is rejected after reading just over the limit."""

    def __init__(self, path: str, sr: int, channels: int, max_seconds: float | None):
        if not 0 < sr <= _MAX_RATE:
            raise AudioError(
                f"audio header declares a sample rate of {sr} Hz (readable: 1 to {_MAX_RATE} Hz); "
                f"re-encode it as WAV or FLAC: {path}"
            )
        if channels < 1:
            raise AudioError(f"audio header declares {channels} channels; re-encode it as WAV or FLAC: {path}")
        self.path, self.sr, self.channels, self.max_seconds = path, sr, channels, max_seconds
        # one frame more than max_seconds + 1 s: reaching it proves the file too long, whatever remains
        self.limit = None if max_seconds is None else int((max_seconds + 1.0) * sr) + 1
        self.block_frames = max(1, _BLOCK_SAMPLES // channels)  # a block's samples, not frames, are bounded
        self.frames = 0
        self._parts: list[np.ndarray] = []

    def add(self, block: np.ndarray) -> bool:
        """Add a (frames, channels) block; False once the limit is reached (stop decoding)."""
        if self.limit is not None:
            block = block[: self.limit - self.frames]
        self._parts.append(block.mean(axis=1, dtype=np.float32) if self.channels > 1 else block[:, 0].copy())
        self.frames += len(block)
        return self.limit is None or self.frames < self.limit

    def over_long(self) -> bool:
        return self.limit is not None and self.frames >= self.limit

    def wave(self) -> np.ndarray:
        if self.over_long():
            raise AudioError(
                f"audio is longer than {self.frames / self.sr:.1f} s (decoding stopped there), over --max-seconds "
                f"{self.max_seconds:g} (cut it shorter): {self.path}"
            )
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)


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
        # a hostile file may not announce its length (or lie about it): never decode more than the limit
        out = _Bounded(path, sr, int(f.channels), max_seconds)
        while True:
            block = f.read(out.block_frames, dtype="float32", always_2d=True)
            if not len(block) or not out.add(block):
                break
    wave = out.wave()
    if known and len(wave) < announced * 0.98 - 2304:  # an mp3 decoder stops early on a cut stream (2 frames slack)
        raise _truncated(f"{announced / sr:.2f} s announced, {len(wave) / sr:.2f} s decodable", path)
    return wave, sr


def _read_fallback(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """audioread: the standard library's wave/aifc/sunau readers, and ffmpeg where it is installed. It yields
    16-bit little-endian interleaved PCM in buffers that need not end on a frame (ffmpeg's do not)."""
    import audioread

    with audioread.audio_open(path) as f:
        out = _Bounded(path, int(f.samplerate), int(f.channels), max_seconds)
        frame_bytes, pending = 2 * out.channels, b""
        for buf in f:
            pending += buf
            whole = len(pending) - len(pending) % frame_bytes
            block = np.frombuffer(pending[:whole], dtype="<i2").reshape(-1, out.channels)
            pending = pending[whole:]
            if not out.add(block.astype(np.float32) / 32768.0):
                break  # closing the file stops the decoder (ffmpeg's process is killed)
    return out.wave(), out.sr


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
    try:  # formats libsndfile lacks (m4a, wma, ...), bounded like libsndfile's path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_fallback(path, max_seconds)
    except AudioError:
        raise
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
