"""Stage 4 of the data flow: encoded samples -> WebDataset tar shards + index.json.

On-disk layout of a shard directory (schema 1):

    DIR/shard-000000.tar      WebDataset tar; per sample two members with the same key (a 9-digit ordinal):
        KEY.json              the ChatML sample (messages with their original audio_url), its source
                              (manifest, line), speaker, and "audio": [{"url", "frames", "seconds"}] in order
        KEY.codes.npy         uint16 (num_codebooks, sum of frames): every audio item's codes, concatenated
                              in order of appearance (no pickle: numpy .npy with a plain dtype)
    DIR/index.json            schema version, codec provenance, per-shard file/count/bytes/sha256/seconds
    DIR/rejects.jsonl         every input line that was not written, with its reason

Tar members get fixed metadata (mtime 0, fixed owner and mode), so the same input gives the same bytes.
Shards are written to a temporary name and renamed when complete, so a complete-looking shard is complete.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def encode_codes(codes: np.ndarray) -> bytes:
    assert codes.dtype == np.uint16 and codes.ndim == 2, (codes.dtype, codes.shape)
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes samples into numbered shards of at most `max_samples` samples / `max_bytes` bytes.

    `first_shard` lets parallel builders own disjoint shard numbers."""

    def __init__(
        self, out_dir: str | os.PathLike, *, max_samples: int = 1000, max_bytes: int = 256 << 20, first_shard: int = 0
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.next_number = first_shard
        self.next_key = 0
        self.shards: list[dict] = []
        self._tar = None

    def _open(self) -> None:
        import webdataset as wds

        name = shard_name(self.next_number)
        self._tmp_path = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp_path, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="higgs", group="higgs", mode=0o444)
        self._entry = {"file": name, "num_samples": 0, "bytes": 0, "audio_seconds": 0.0, "target_frames": []}

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        final = self.out_dir / self._entry["file"]
        os.replace(self._tmp_path, final)
        from higgs_ds.codec import sha256_file

        frames = self._entry.pop("target_frames")
        self._entry.update(
            bytes=final.stat().st_size,
            sha256=sha256_file(final),
            audio_seconds=round(self._entry["audio_seconds"], 3),
            target_frames={"min": min(frames), "max": max(frames), "sum": sum(frames)},
        )
        self.shards.append(self._entry)
        self._tar = None
        self.next_number += 1

    def write(self, sample_json: dict, codes: np.ndarray, audio_seconds: float, target_frames: int) -> None:
        if self._tar is None:
            self._open()
        key = f"{self.next_key:09d}"
        self.next_key += 1
        payload = {
            "__key__": key,
            "json": json.dumps(sample_json, ensure_ascii=False, sort_keys=True).encode(),
            "codes.npy": encode_codes(codes),
        }
        self._entry["bytes"] += self._tar.write(payload)
        self._entry["num_samples"] += 1
        self._entry["audio_seconds"] += audio_seconds
        self._entry["target_frames"].append(target_frames)
        if self._entry["num_samples"] >= self.max_samples or self._entry["bytes"] >= self.max_bytes:
            self._finish()

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_index(out_dir: str | os.PathLike, shards: list[dict], codec_provenance: dict, summary: dict) -> Path:
    index = {
        "schema_version": SCHEMA_VERSION,
        "format": "higgs-ds webdataset shards",
        "codec": codec_provenance,
        "num_samples": sum(s["num_samples"] for s in shards),
        "audio_seconds": round(sum(s["audio_seconds"] for s in shards), 3),
        "shards": shards,
        "build": summary,
    }
    path = Path(out_dir) / INDEX_NAME
    write_json_atomic(path, index)
    return path
