"""The files `higgs-ds synthesize` writes into --out: ID.wav, ID.codes.npy and the synthesize.jsonl manifest.

--out is the user's folder: an output that exists is refused (its line named) unless --overwrite, a folder in
the way is refused always, and the manifest must be one this command wrote (earlier runs' lines are kept;
with --overwrite the line of a replaced file is replaced). Every file is written atomically, the manifest
again after each WAV, so after a crash it lists exactly the files that were completed.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.safe_io import atomic_write_bytes, atomic_write_text

MANIFEST = "synthesize.jsonl"
LOCK = ".synthesize.lock"


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """A mono IEEE-float WAV of the codec's samples as they are (16-bit PCM would round them and clip peaks
    over 1), written here rather than by libsndfile, whose float files carry a PEAK chunk with the time of
    writing: the same codes give the same bytes."""
    data = np.ascontiguousarray(wave, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHHH", 3, 1, sample_rate, sample_rate * 4, 4, 32, 0)  # WAVE_FORMAT_IEEE_FLOAT
    fact = struct.pack("<I", len(data) // 4)  # non-PCM WAVs state their sample count
    chunks = [b"fmt ", struct.pack("<I", len(fmt)), fmt, b"fact", struct.pack("<I", 4), fact]
    chunks += [b"data", struct.pack("<I", len(data)), data]
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def npy_bytes(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(codes, dtype=np.uint16), allow_pickle=False)
    return buf.getvalue()


class Outputs:
    def __init__(self, out, overwrite: bool = False):
        self.dir = Path(out)
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"--out {out} is a file: pass a folder (it is made if missing)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite
        self.manifest = self.dir / MANIFEST
        self.entries = self._read_manifest()

    def lock(self):
        from higgs_ds.safe_io import DirLock

        return DirLock(self.dir, LOCK, what="synthesize")

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.wav", self.dir / f"{name}.codes.npy"

    def blocked(self, name: str) -> str | None:
        """Why `name`'s files may not be written, or None."""
        for path in self.paths(name):
            if path.is_dir():
                return f"{path} is a folder: move it away or change the id"
            if (path.exists() or path.is_symlink()) and not self.overwrite:
                return f"{path} exists: pass --overwrite to replace it, or change the id / --out"
        return None

    def write(self, name: str, wave: np.ndarray, codes: np.ndarray, sample_rate: int, entry: dict) -> Path:
        wav, npy = self.paths(name)
        atomic_write_bytes(npy, npy_bytes(codes))
        atomic_write_bytes(wav, wav_bytes(wave, sample_rate))
        self.entries = [e for e in self.entries if e.get("wav") != wav.name] + [entry]
        atomic_write_text(self.manifest, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.entries))
        return wav

    def _read_manifest(self) -> list[dict]:
        if not self.manifest.exists():
            return []
        fix = "move it away or choose another --out"
        if not self.manifest.is_file():
            raise UserError(f"{self.manifest} is not a regular file: {fix}")
        entries = []
        try:
            lines = self.manifest.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{self.manifest} cannot be read ({err}): {fix}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("wav"), str):
                raise UserError(f"{self.manifest} line {number} is not a line higgs-ds synthesize wrote: {fix}")
            entries.append(entry)
        return entries
