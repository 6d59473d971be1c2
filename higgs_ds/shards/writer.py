"""Stage 4 of the data flow: encoded samples -> WebDataset tar shards + index.json.

On-disk layout of a shard directory (schema 2):

    DIR/shard-000000.tar      WebDataset tar; per sample two or three members, one key (the sample's
                              9-digit ordinal in the build's whole input):
        KEY.json              the ChatML sample (messages with their original audio_url), its source
                              (manifest, line), speaker, "audio": [{"url", "frames", "seconds"}] in order of
                              appearance, "target_frames", and "expanded_length" (and for a plain
                              single-speaker TTS sample "clone_parts") when built with a v2 --tokenizer,
                              "v3": {"expanded_length", "clone_parts"} with a Higgs TTS 3 one
                              (shards.lengths)
        KEY.codes.npy         uint16 (num_codebooks, sum of frames): every audio item's codes, concatenated
                              in order of appearance (numpy .npy with a plain dtype: no pickle)
        KEY.tokens.npy        with a v2 --tokenizer: int32 (2, n), boson's input_ids and label_ids (-100:
                              not trained), read by training without parsing a JSON list (shards built by
                              earlier versions keep them as "input_ids"/"label_ids" in KEY.json; both read)
    DIR/index.json            schema version, codec provenance, per-shard file/count/bytes/sha256/seconds,
                              target-frame and expanded-length statistics, the speaker table, the
                              sidecar's name/bytes/sha256 ("sample_table"), and the build summary
    DIR/index.samples.npy     per sample: shard, expanded length, speaker id, clone_parts, and with a v3
                              --tokenizer v3_length, v3_clone_parts (one structured numpy array, see
                              shards.sample_table; what the epoch plan reads)
    DIR/rejects.jsonl         every input line that was not written, with its reason

A job-array build (--slice I/N) names its shards shard-IIII-NNNNNN.tar and writes index.slice-*.json and
rejects.slice-*.jsonl until `higgs-ds shards index` merges them (a slice index keeps the per-sample lists
in its JSON, schema 1: it is read once, by the merge). Tar members get fixed metadata (mtime 0,
fixed owner and mode), so the same input gives the same bytes. Shards are written under a temporary name
that no other process picks (safe_io.temp_path), fsynced, and renamed when complete (safe_io.publish), so a
shard that exists is complete and durable; index.json is written the same way (safe_io.atomic_write_json).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from higgs_ds.safe_io import atomic_write_json, publish, temp_path
from higgs_ds.shards.codec import sha256_file
from higgs_ds.shards.lengths import UNSUPPORTED_IDS_SHOWN, V3_KEY
from higgs_ds.stream.tokens import plain_tts, speaker_of

# Schema 1: per-shard lists "lengths", "speakers" and "clone_parts" in index.json ("speakers" and
# "clone_parts" optional: an index written before them is still read, and cloning references refused).
# Schema 2: the per-sample values in the sidecar index.samples.npy. Both are read.
SCHEMA_VERSION = 2
SCHEMA_LISTS = 1
READABLE_SCHEMAS = (SCHEMA_LISTS, SCHEMA_VERSION)
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"


def encode_codes(codes: np.ndarray) -> bytes:
    assert codes.dtype == np.uint16 and codes.ndim == 2, (codes.dtype, codes.shape)
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    return buf.getvalue()


def encode_tokens(input_ids: list[int], label_ids: list[int]) -> bytes:
    """The KEY.tokens.npy member: int32 (2, n) C-order, row 0 the input ids, row 1 the labels."""
    tokens = np.array([input_ids, label_ids], dtype="<i4")
    assert tokens.ndim == 2 and tokens.shape[1] > 0, tokens.shape
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


def _stats(values: list[int]) -> dict:
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 1), "sum": sum(values)}


class ShardWriter:
    """Writes samples into numbered shards of at most `max_samples` samples / about `max_bytes` bytes."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_samples: int = 1000,
        max_bytes: int = 256 << 20,
        name_pattern: str = "shard-{:06d}.tar",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.name_pattern = name_pattern
        self.shards: list[dict] = []
        self._tar = None

    def restore(self, shards: list[dict]) -> None:
        """Continue after these already complete shards (resume)."""
        self.shards = list(shards)

    def _open(self) -> None:
        import webdataset as wds

        name = self.name_pattern.format(len(self.shards))
        self._tmp_path = temp_path(self.out_dir / name)
        self._file = open(self._tmp_path, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="higgs", group="higgs", mode=0o444)
        self._entry = {"file": name, "num_samples": 0, "bytes": 0, "audio_seconds": 0.0}
        self._frames, self._expanded, self._speakers, self._clone = [], [], [], []
        self._v3_lengths, self._v3_clone, self._v3_unsupported = [], [], []

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        final = publish(self._tmp_path, self.out_dir / self._entry["file"])  # fsynced before it is visible
        self._entry.update(
            bytes=final.stat().st_size,
            sha256=sha256_file(final),
            audio_seconds=round(self._entry["audio_seconds"], 3),
            target_frames=_stats(self._frames),
            speakers=self._speakers,  # per sample, for cloning references drawn from the same speaker
            clone_parts=self._clone,
        )
        if self._expanded:  # per-sample lengths let the reader plan budget batches from the index alone
            self._entry["expanded_lengths"] = _stats(self._expanded)
            self._entry["lengths"] = self._expanded
        if self._v3_lengths:  # built with a Higgs TTS 3 tokenizer (shards.lengths)
            known = [n for n in self._v3_lengths if n is not None]
            if known:
                self._entry["v3_expanded_lengths"] = _stats(known)
            self._entry.update(v3_lengths=self._v3_lengths, v3_clone_parts=self._v3_clone)
            self._entry["v3_unsupported_ids"] = self._v3_unsupported
        self.shards.append(self._entry)
        self._tar = None

    def write(self, key: str, sample_json: dict, codes: np.ndarray, audio_seconds: float) -> bool:
        """Add one sample; True when this sample completed a shard."""
        if self._tar is None:
            self._open()
        meta = {k: v for k, v in sample_json.items() if k not in ("input_ids", "label_ids")}
        payload = {
            "__key__": key,
            # backslashreplace: a non-UTF-8 manifest file name (in "source") is written as a \udcXX escape
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8", "backslashreplace"),
            "codes.npy": encode_codes(codes),
        }
        if "input_ids" in sample_json:  # stored as binary: training reads them without parsing JSON lists
            payload["tokens.npy"] = encode_tokens(sample_json["input_ids"], sample_json["label_ids"])
        self._entry["bytes"] += self._tar.write(payload)
        self._entry["num_samples"] += 1
        self._entry["audio_seconds"] += audio_seconds
        self._frames.append(sample_json["target_frames"])
        if "expanded_length" in sample_json:
            self._expanded.append(sample_json["expanded_length"])
        self._speakers.append(speaker_of(sample_json))
        # None: not a plain TTS sample; [None, None]: one, but built without --tokenizer (no lengths)
        self._clone.append(sample_json.get("clone_parts", [None, None]) if plain_tts(sample_json) else None)
        v3 = sample_json.get(V3_KEY)
        if v3 is not None:
            self._v3_lengths.append(v3["expanded_length"])
            self._v3_clone.append(v3["clone_parts"])
            if v3["expanded_length"] is None and len(self._v3_unsupported) < UNSUPPORTED_IDS_SHOWN:
                self._v3_unsupported.append(sample_json.get("id"))
        if self._entry["num_samples"] >= self.max_samples or self._entry["bytes"] >= self.max_bytes:
            self._finish()
            return True
        return False

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (the build stopped): its temp file is removed, nothing is published."""
        if self._tar is not None:
            try:
                self._tar.close()  # the tar stream first: closed after its file, it warns as it is collected
            except OSError:
                pass  # a full disk, say: the temp file is removed below either way
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = None


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    atomic_write_json(path, obj, indent=1, sort_keys=True)


def write_index(
    path: str | os.PathLike, shards: list[dict], codec_provenance: dict, summary: dict, sidecar: bool = True
) -> Path:
    """index.json from the writer's shard entries (with their per-sample lists): with `sidecar`, the lists go
    to index.samples.npy (written first) and the speaker table into the index; else they stay (schema 1)."""
    path = Path(path)
    index = {
        "schema_version": SCHEMA_VERSION if sidecar else SCHEMA_LISTS,
        "format": "higgs-ds webdataset shards",
        "codec": codec_provenance,
        "num_samples": sum(s["num_samples"] for s in shards),
        "audio_seconds": round(sum(s["audio_seconds"] for s in shards), 3),
        "shards": shards,
        "build": summary,
    }
    if sidecar:
        from higgs_ds.shards.sample_table import write_sample_table

        table, speakers, index["shards"] = write_sample_table(path.parent, path.name, shards)
        index.update(sample_table=table, speaker_table=speakers)
    write_json_atomic(path, index)
    return path
