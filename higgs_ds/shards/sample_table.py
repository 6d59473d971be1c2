"""Per-sample arrays of a shard set: index.samples.npy, the binary sidecar of index.json (schema 2).

An index of 10M samples holding its per-sample lists in JSON would be ~270 MB, parsed again by every rank
and entry point; the sidecar is one structured numpy array (no object fields, np.save) that a process maps
once (np.load(allow_pickle=False, mmap_mode="r")) and checks with a few vectorized passes. One row per
sample, in shard order:

    shard        int32       the shard's place in index.json's "shards"
    length       int32       expanded length (built with --tokenizer); -1: unknown (for the whole shard)
    speaker      int32       id into index.json's "speaker_table"; -1: no speaker
    clone_parts  int32 (2,)  (head, pair) of a plain single-speaker TTS sample (see tokens.clone_parts);
                             (-1, -1): not one; (-2, -2): one, built without --tokenizer

and, in a set built with a Higgs TTS 3 ("v3") --tokenizer (shards.lengths), the same two in v3's positions:

    v3_length      int32       expanded length of the v3 prompt; -1: v3 does not train the sample
    v3_clone_parts int32 (2,)  (head 1, pair) of a plain TTS sample v3 trains; (-1, -1): any other

A sidecar without the v3 columns (built without a v3 tokenizer, or before they existed) reads as v3
lengths unknown: no lengths, and v3 clone_parts (-2, -2) where the v2 ones say plain TTS, else (-1, -1).
index.json (the human-readable summary) names it under "sample_table" with its byte size and sha256,
checked when it is loaded: the file is untrusted data, so its dtype, shape, shard numbers and value ranges
are checked too, and any problem is one ShardError naming the file. A schema-1 index (per-shard lists
"lengths", "speakers", "clone_parts" in the JSON, no sidecar) is read into the same table.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_ds.safe_io import atomic_write_bytes
from higgs_ds.shards.format import INDEX_FIX, ShardError
from higgs_ds.shards.lengths import V2, V3

SAMPLE_DTYPE = np.dtype([("shard", "<i4"), ("length", "<i4"), ("speaker", "<i4"), ("clone_parts", "<i4", (2,))])
V3_SAMPLE_DTYPE = np.dtype(SAMPLE_DTYPE.descr + [("v3_length", "<i4"), ("v3_clone_parts", "<i4", (2,))])
NO_LENGTH = NO_SPEAKER = -1
NOT_PLAIN = (-1, -1)  # clone_parts None: not a plain single-speaker TTS sample (or its turns did not split)
UNSIZED = (-2, -2)  # clone_parts [None, None]: a plain TTS sample built without --tokenizer
INT32_MAX = 2**31 - 1
SIDECAR_FIX = "rebuild the shard set with `higgs-ds shards build` (`higgs-ds shards verify DIR` checks a set)"
HASH_CHUNK = 8 << 20
COLUMNS = (  # for the reader of index.json
    "shard int32; length int32 (-1 unknown); speaker int32 (id into speaker_table, -1 none); clone_parts "
    "int32 x 2 (head, pair; -1 -1 not a plain TTS sample, -2 -2 built without --tokenizer)"
)
V3_COLUMNS = COLUMNS + (
    "; v3_length int32 (Higgs TTS 3 positions, -1: not a sample v3 trains); v3_clone_parts int32 x 2 "
    "(head, pair in v3 positions; -1 -1 not a plain TTS sample v3 trains)"
)


def sidecar_name(index_name: str) -> str:
    """index.json -> index.samples.npy"""
    return index_name.removesuffix(".json") + ".samples.npy"


@dataclass(frozen=True)
class SampleTable:
    """The per-sample rows of one shard directory, with what each shard records (a schema-1 index may lack
    a shard's lengths, speakers or clone_parts)."""

    rows: np.ndarray  # SAMPLE_DTYPE, one row per sample in shard order (a read-only map of the sidecar)
    speaker_names: tuple[str, ...]  # speaker id -> its string
    starts: np.ndarray  # int64 (shards + 1,): first row of each shard, then the number of rows
    recorded: np.ndarray  # bool (shards, 3): lengths, speakers, clone_parts recorded for the shard
    v3_recorded: np.ndarray | None = None  # bool (shards,): v3 lengths and clone_parts recorded (None: none)

    def shard_fields(self, k: int, family: str = V2) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(lengths, speaker ids, clone_parts (n, 2)) of shard k as int32 views, None where not recorded;
        `family` "v3": the v3 lengths and clone_parts (unknown ones as the module docstring says)."""
        part = self.rows[self.starts[k] : self.starts[k + 1]]
        has_lengths, has_speakers, has_parts = self.recorded[k]
        speakers = part["speaker"] if has_speakers else None
        if family == V3:
            if self.v3_recorded is not None and self.v3_recorded[k]:
                return part["v3_length"], speakers, part["v3_clone_parts"]
            return None, speakers, _v3_unsized(part["clone_parts"]) if has_parts else None
        if family != V2:
            raise ValueError(f"family {family!r}: expected {V2!r} or {V3!r}")
        return (part["length"] if has_lengths else None, speakers, part["clone_parts"] if has_parts else None)


def _v3_unsized(parts: np.ndarray) -> np.ndarray:
    """v3 clone_parts of samples without v3 lengths: (-2, -2) where the v2 ones say plain TTS."""
    plain = parts[:, 0] != NOT_PLAIN[0]
    out = np.full(parts.shape, NOT_PLAIN[0], np.int32)
    out[plain] = UNSIZED
    return out


# ---------------------------------------------------------------- per-shard lists -> rows


def _starts(counts: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64)


def _encode_parts(parts: list, bad) -> np.ndarray:
    out = np.empty((len(parts), 2), np.int64)
    for i, p in enumerate(parts):
        if p is None:
            out[i] = NOT_PLAIN
        elif p[0] is None and p[1] is None:
            out[i] = UNSIZED
        elif p[0] is None or p[1] is None:
            raise bad(f"clone_parts[{i}] is {p}: either both parts or neither is known")
        else:
            out[i] = p
    return out


def _int32(values, what: str, bad) -> np.ndarray:
    values = np.asarray(values, np.int64)
    if values.size and values.max() > INT32_MAX:
        raise bad(f"'{what}' holds {int(values.max())}, over the int32 range of index.samples.npy")
    return values


def _has_v3(shards: list[dict], bad) -> bool:
    """Whether the entries list v3 lengths: all of them or none (one build gives every shard the same)."""
    with_v3 = [k for k, e in enumerate(shards) if e.get("v3_lengths") is not None]
    if with_v3 and len(with_v3) != len(shards):
        k = next(k for k, e in enumerate(shards) if e.get("v3_lengths") is None)
        raise bad(f"shards[{k}] ({shards[k]['file']}) lists no v3_lengths, other shards do")
    return bool(with_v3)


def _v3_rows(part: np.ndarray, entry: dict, shard_bad) -> None:
    lengths, parts = entry["v3_lengths"], entry.get("v3_clone_parts")
    n = entry["num_samples"]
    if len(lengths) != n or parts is None or len(parts) != n:
        raise shard_bad(f"lists {len(lengths)} v3_lengths and {len(parts or ())} v3_clone_parts for {n} samples")
    part["v3_length"] = _int32([NO_LENGTH if v is None else v for v in lengths], "v3_lengths", shard_bad)
    if any(p is not None and None in p for p in parts):
        raise shard_bad("v3_clone_parts holds an unsized [head, pair]: v3 sizes every plain sample it trains")
    encoded = _encode_parts(parts, shard_bad) if parts else np.zeros((0, 2), np.int64)
    part["v3_clone_parts"] = _int32(encoded, "v3_clone_parts", shard_bad)


def rows_from_lists(shards: list[dict], bad) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(rows, speaker table, recorded) from per-shard lists (the writer's entries, or a schema-1 index whose
    values the schema check has typed); speaker ids are given in first-seen order. `bad(what)` makes the
    error of a shard's entry. Rows have the v3 columns when the entries list v3 lengths."""
    counts = [e["num_samples"] for e in shards]
    starts = _starts(counts)
    with_v3 = _has_v3(shards, bad)
    rows = np.zeros(int(starts[-1]), V3_SAMPLE_DTYPE if with_v3 else SAMPLE_DTYPE)
    rows["shard"] = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
    recorded = np.zeros((len(shards), 3), bool)
    table: dict[str, int] = {}
    for k, entry in enumerate(shards):
        part, where = rows[starts[k] : starts[k + 1]], f"shards[{k}] ({entry['file']})"

        def shard_bad(what: str, where=where) -> ShardError:
            return bad(f"{where}: {what}")

        lengths, speakers, parts = entry.get("lengths"), entry.get("speakers"), entry.get("clone_parts")
        for key, values in (("lengths", lengths), ("speakers", speakers), ("clone_parts", parts)):
            if values is not None and len(values) != entry["num_samples"]:
                raise shard_bad(f"lists {len(values)} {key} for {entry['num_samples']} samples")
        recorded[k] = (bool(lengths), speakers is not None, parts is not None)  # [] lengths: none (as before)
        part["length"] = _int32(lengths, "lengths", shard_bad) if lengths else NO_LENGTH
        if speakers is not None:
            part["speaker"] = [NO_SPEAKER if s is None else table.setdefault(s, len(table)) for s in speakers]
        else:
            part["speaker"] = NO_SPEAKER
        encoded = _encode_parts(parts, shard_bad) if parts is not None else np.full((len(part), 2), NOT_PLAIN)
        part["clone_parts"] = _int32(encoded, "clone_parts", shard_bad)
        if with_v3:
            _v3_rows(part, entry, shard_bad)
    return rows, list(table), recorded


# ---------------------------------------------------------------- writing


def write_sample_table(directory: Path, index_name: str, shards: list[dict]) -> tuple[dict, list[str], list[dict]]:
    """Write the sidecar of the index `index_name` from the writer's per-shard lists (durable, under a temp
    name until whole); returns (its descriptor for index.json, the speaker table, the shard entries without
    their per-sample lists)."""

    def bad(what: str) -> ShardError:
        return ShardError(f"{directory / index_name}: {what}")

    rows, speakers, _ = rows_from_lists(shards, bad)
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    data = buf.getvalue()
    name = sidecar_name(index_name)
    atomic_write_bytes(directory / name, data)
    descriptor = {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": len(rows)}
    descriptor["columns"] = V3_COLUMNS if rows.dtype == V3_SAMPLE_DTYPE else COLUMNS
    per_sample = ("lengths", "speakers", "clone_parts", "v3_lengths", "v3_clone_parts")
    return descriptor, speakers, [{k: v for k, v in e.items() if k not in per_sample} for e in shards]


# ---------------------------------------------------------------- reading


def _file_problem(directory: Path, name: str, size: int) -> str | None:
    """Why the sidecar is not a regular file inside `directory` of `size` bytes, or None (nothing opened)."""
    path = directory / name
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real, root = os.path.realpath(path), os.path.realpath(directory)
            if os.path.commonpath([real, root]) != root:
                return f"is a symbolic link to {real}, outside {directory}"
            st = os.stat(path)
    except FileNotFoundError:
        return "is missing (index.json names it)"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size != size:
        return f"has {st.st_size} bytes, index.json says {size}: it was changed or cut short after the build"
    return None


def sidecar_problem(directory: str | Path, index: dict) -> str | None:
    """For a schema-2 index: why its sidecar is missing or of the wrong size (a one-line message naming it)."""
    desc = index.get("sample_table")
    if desc is None:
        return None
    problem = _file_problem(Path(directory), desc["file"], desc["bytes"])
    return f"{Path(directory) / desc['file']} {problem}; {SIDECAR_FIX}" if problem else None


def _sha256(path: Path) -> tuple[str, os.stat_result]:
    with open(path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        hasher = hashlib.sha256()
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest(), before


def _map(path: Path, bad) -> np.ndarray:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # np.load would open a zip as an .npz archive, and anything else as a pickle
        raise bad("is not a .npy array (it does not start with the .npy magic)")
    try:
        rows = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError, TypeError, SyntaxError) as err:
        raise bad(f"is not a .npy array this reader maps ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(rows, np.ndarray):
        raise bad("is not a .npy array")
    return rows


def _check_rows(rows: np.ndarray, index: dict, bad) -> np.ndarray:
    """The starts of each shard's rows, once every value is in range; else bad(what)."""
    if rows.dtype not in (SAMPLE_DTYPE, V3_SAMPLE_DTYPE):
        raise bad(
            f"holds dtype {str(rows.dtype)[:200]}, expected {SAMPLE_DTYPE} (or with v3 columns {V3_SAMPLE_DTYPE})"
        )
    counts = [e["num_samples"] for e in index["shards"]]
    starts = _starts(counts)
    if rows.shape != (int(starts[-1]),):
        raise bad(f"holds shape {rows.shape}, index.json lists {int(starts[-1])} samples")
    expected = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    if not np.array_equal(rows["shard"], expected):
        i = int(np.flatnonzero(rows["shard"] != expected)[0])
        raise bad(f"row {i} says shard {int(rows['shard'][i])}, by index.json's counts it is in shard {expected[i]}")
    lengths = rows["length"]
    if lengths.size and int(lengths.min()) < NO_LENGTH:
        raise bad(f"row {int(np.argmin(lengths))} has length {int(lengths.min())} (a length is >= 0, or -1 unknown)")
    unknown = np.bincount(rows["shard"][lengths == NO_LENGTH], minlength=len(counts))
    mixed = np.flatnonzero((unknown != 0) & (unknown != np.asarray(counts)))
    if mixed.size:
        raise bad(f"shard {int(mixed[0])} has lengths for some samples only (all or none are known)")
    speakers, top = rows["speaker"], len(index.get("speaker_table", ()))
    if speakers.size and (int(speakers.min()) < NO_SPEAKER or int(speakers.max()) >= top):
        i = int(np.flatnonzero((speakers < NO_SPEAKER) | (speakers >= top))[0])
        raise bad(f"row {i} has speaker id {int(speakers[i])}, outside the speaker table of {top} (or -1)")
    head, pair = rows["clone_parts"][:, 0], rows["clone_parts"][:, 1]
    ok = ((head >= 0) & (pair >= 0)) | ((head == pair) & ((head == NOT_PLAIN[0]) | (head == UNSIZED[0])))
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise bad(f"row {i} has clone_parts {rows['clone_parts'][i].tolist()} (expected >= 0, or -1 -1, or -2 -2)")
    if rows.dtype == V3_SAMPLE_DTYPE:
        _check_v3_rows(rows, bad)
    return starts


def _check_v3_rows(rows: np.ndarray, bad) -> None:
    """v3 lengths >= 0 or -1; v3 clone_parts >= 0 (of a sample with a v3 length they add up to, plain TTS
    by the v2 columns too) or -1 -1."""
    lengths, head, pair = rows["v3_length"], rows["v3_clone_parts"][:, 0], rows["v3_clone_parts"][:, 1]
    if lengths.size and int(lengths.min()) < NO_LENGTH:
        i = int(np.argmin(lengths))
        raise bad(f"row {i} has v3_length {int(lengths[i])} (a length is >= 0, or -1: not a sample v3 trains)")
    sized = (head >= 0) & (pair >= 0)
    ok = sized | ((head == NOT_PLAIN[0]) & (pair == NOT_PLAIN[1]))
    sized_ok = (lengths >= 0) & (rows["clone_parts"][:, 0] != NOT_PLAIN[0])
    sized_ok &= -(-(head.astype(np.int64) + pair) // 8) * 8 == lengths
    ok &= ~sized | sized_ok
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise bad(
            f"row {i} has v3_clone_parts {rows['v3_clone_parts'][i].tolist()} with v3_length {int(lengths[i])} "
            "(expected -1 -1, or parts >= 0 of a plain TTS sample adding up to its v3 length rounded up to 8)"
        )


# path -> (signature, table): a sidecar is hashed and checked once per process (forked workers share it)
_LOADED: dict[str, tuple[tuple, SampleTable]] = {}


def _signature(st: os.stat_result, desc: dict, index: dict) -> tuple:
    counts = tuple(e["num_samples"] for e in index["shards"])
    return (st.st_ino, st.st_size, st.st_mtime_ns, desc["sha256"], counts, tuple(index["speaker_table"]))


def _load_sidecar(directory: Path, index: dict) -> SampleTable:
    desc = index["sample_table"]
    path = directory / desc["file"]

    def bad(what: str) -> ShardError:
        return ShardError(f"{path} {what}; {SIDECAR_FIX}")

    problem = _file_problem(directory, desc["file"], desc["bytes"])
    if problem:
        raise bad(problem)
    st = os.stat(path)
    cached = _LOADED.get(str(path))
    if cached is not None and cached[0] == _signature(st, desc, index):
        return cached[1]
    digest, st = _sha256(path)
    if digest != desc["sha256"]:
        raise bad("differs from its sha256 in index.json: it was changed after the build")
    rows = _map(path, bad)
    after = os.stat(path)
    if (after.st_ino, after.st_size, after.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
        raise bad("changed while it was read")
    starts = _check_rows(rows, index, bad)
    recorded = np.zeros((len(index["shards"]), 3), bool)
    recorded[:, 1:] = True  # the writer always records speakers and clone_parts
    recorded[:, 0] = np.bincount(rows["shard"][rows["length"] != NO_LENGTH], minlength=len(index["shards"])) > 0
    v3_recorded = np.full(len(index["shards"]), rows.dtype == V3_SAMPLE_DTYPE)  # the writer sizes every shard
    table = SampleTable(rows, tuple(index["speaker_table"]), starts, recorded, v3_recorded)
    _LOADED[str(path)] = (_signature(st, desc, index), table)
    return table


def load_sample_table(directory: str | Path, index: dict, index_path) -> SampleTable:
    """The per-sample rows of the validated `index` of `directory`: its sidecar (schema 2), or its per-shard
    lists (schema 1)."""
    if "sample_table" in index:
        return _load_sidecar(Path(directory), index)

    def bad(what: str) -> ShardError:
        return ShardError(f"{index_path}: {what}; {INDEX_FIX}")

    rows, speakers, recorded = rows_from_lists(index["shards"], bad)
    v3_recorded = np.full(len(index["shards"]), rows.dtype == V3_SAMPLE_DTYPE)
    starts = _starts([e["num_samples"] for e in index["shards"]])
    return SampleTable(rows, tuple(speakers), starts, recorded, v3_recorded)
