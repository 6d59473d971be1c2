"""The one strict parser of what a shard directory holds: index.json, tar headers, `.npy` codes, `.json` samples.

Every read of a shard (training's member table, `shards verify`, `shards stats`, evaluation) goes through
here, so a hostile or corrupt file fails the same way everywhere: a ShardError naming the file (and the
member, header offset or index key) and saying what to do, before anything is allocated from a declared
size and before a sample can reach the model.

    index = validate_index(orjson.loads(raw), index_path)   # schema, bare names, counts bounded by bytes
    problem = shard_file_problem(shard_dir, entry)          # regular file inside the directory, its size
    members = scan_tar(path, spec)                          # (name, offset, size); size + sha256 same pass
    table = group_samples(path, members)                    # per sample its .json and .codes.npy member
    codes = decode_codes(data, where)                       # uint16 (K, T) view: no np.load, no pickle
    tokens = decode_tokens(data, where)                     # int32 (2, n) view: input ids, label ids
    check_sample(record, path, names, limits)               # fields training needs; codes and ids in range

Only what the builder writes is accepted: POSIX ustar headers of regular files with octal numbers and a
valid checksum (pax and GNU extension headers, links, devices and base-256 numbers are refused by name:
Python's tarfile is never used on a shard, since it hangs on a pax header with a negative size), members
KEY.json, KEY.codes.npy (C-order '<u2' 2-D arrays) and, from a v2 --tokenizer, KEY.tokens.npy (C-order
'<i4' (2, n) arrays), each array's declared shape matching its bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import orjson

from higgs_ds.errors import UserError
from higgs_ds.shards import verified
from higgs_ds.shards.manifest import BadSample, audio_items
from higgs_ds.shards.manifest import _check_chatml as check_chatml
from higgs_ds.shards.writer import READABLE_SCHEMAS, SCHEMA_LISTS, SCHEMA_VERSION

REBUILD = "rebuild the shard with `higgs-ds shards build`"
INDEX_FIX = (
    "it was edited or not written by higgs-ds: rebuild the shard set with `higgs-ds shards build` "
    "(`higgs-ds shards index` for a sliced build)"
)
MEMBER_TYPES = ("json", "codes.npy", "tokens.npy")
# a sample's members: its JSON and codes, and (shards built with a v2 --tokenizer) its token ids
SAMPLE_MEMBERS = (["codes.npy", "json"], ["codes.npy", "json", "tokens.npy"])
# schema 1: per-shard lists in index.json (the v3 ones with a Higgs TTS 3 --tokenizer: shards.lengths)
PER_SAMPLE_KEYS = ("lengths", "speakers", "clone_parts", "v3_lengths", "v3_clone_parts")
BLOCK = 512
CHUNK = 1 << 20
# A sample is two members, each a 512-byte header and at least one 512-byte data block: the most samples
# a shard of N bytes can hold is N // 2048, which bounds what an index may declare before anything is
# allocated from its counts.
MIN_SAMPLE_BYTES = 4 * BLOCK
MAX_CODEBOOK_SIZE = 1 << 16  # codes are stored as uint16
MAX_CODEBOOKS = 256  # Higgs codecs have 8; a header claiming more rows is not a codes array

_ZERO_BLOCK = bytes(BLOCK)
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The header np.save writes for a C-order 2-D uint16 array, the only one the builder writes.
_NPY_HEADER = re.compile(rb"\{'descr': '<u2', 'fortran_order': False, 'shape': \((\d{1,19}), (\d{1,19})\), \} *\n")
# ... and the one of the (2, n) int32 token ids
_TOKENS_HEADER = re.compile(rb"\{'descr': '<i4', 'fortran_order': False, 'shape': \(2, (\d{1,19})\), \} *\n")
_TAR_TYPES = {
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long-name header",
    b"K": "a GNU long-link header",
    b"S": "a GNU sparse file",
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a fifo",
    b"7": "a contiguous file",
}


class ShardError(UserError):
    """A shard or index that cannot be read; the message names the file."""


@dataclass(frozen=True)
class ShardSpec:
    """What a shard's index.json entry promises about its file, checked when a process first opens it."""

    num_samples: int
    size: int
    sha256: str


@dataclass(frozen=True)
class SampleLimits:
    """Bounds of a sample's values: codes rows and values from the index's codec provenance, token ids
    from the tokenizer's vocabulary (None: not checked)."""

    num_codebooks: int | None = None
    codebook_size: int | None = None
    vocab_size: int | None = None


# ---------------------------------------------------------------- index.json


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def bare_name_problem(name) -> str | None:
    """Why `name` is not a bare file name of a shard inside its directory, or None."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return "is not a bare file name (no '/', '..', absolute paths or NUL: shards lie in the index's directory)"
    if not name.endswith(".tar"):
        return "does not name a .tar shard"
    return None


def _check_codec(codec, bad) -> None:
    if not isinstance(codec, dict):
        raise bad("'codec' (the codec provenance) is missing or not an object")
    for key in ("num_codebooks", "codebook_size", "sample_rate", "hop_length"):
        if not _is_count(codec.get(key)) or codec[key] == 0:
            raise bad(f"codec.{key} is {codec.get(key)!r}, expected a positive integer")
    if codec["codebook_size"] > MAX_CODEBOOK_SIZE:
        raise bad(f"codec.codebook_size {codec['codebook_size']} does not fit the uint16 codes")
    if not _is_number(codec.get("frame_rate")) or codec["frame_rate"] == 0:
        raise bad(f"codec.frame_rate is {codec.get('frame_rate')!r}, expected a positive number")


def _per_sample_problem(key: str, values, n: int) -> str | None:
    if not isinstance(values, list):
        return f"'{key}' is not a list"
    if len(values) != n:
        return f"lists {len(values)} {key} for {n} samples"
    if key == "lengths":
        ok = all(_is_count(v) for v in values)
    elif key == "v3_lengths":
        ok = all(v is None or _is_count(v) for v in values)
    elif key == "speakers":
        ok = all(v is None or isinstance(v, str) for v in values)
    else:  # (v3_)clone_parts: None, or [head, pair] with each an integer or None
        ok = all(
            v is None or (isinstance(v, list) and len(v) == 2 and all(p is None or _is_count(p) for p in v))
            for v in values
        )
    return None if ok else f"'{key}' holds a value of the wrong type"


def _check_shard_entry(i: int, entry, bad, lists: bool) -> str:
    if not isinstance(entry, dict):
        raise bad(f"shards[{i}] is not an object")
    name = entry.get("file")
    problem = bare_name_problem(name)
    if problem:
        raise bad(f"shards[{i}].file {name!r} {problem}")
    where = f"shards[{i}] ({name})"
    for key in ("num_samples", "bytes"):
        if not _is_count(entry.get(key)):
            raise bad(f"{where}: '{key}' is {entry.get(key)!r}, expected a non-negative integer")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        raise bad(f"{where}: 'sha256' is {entry.get('sha256')!r}, expected 64 lowercase hex digits")
    if entry["num_samples"] * MIN_SAMPLE_BYTES > entry["bytes"]:
        raise bad(
            f"{where} declares {entry['num_samples']} samples in {entry['bytes']} bytes; "
            f"a sample takes at least {MIN_SAMPLE_BYTES} bytes"
        )
    if "audio_seconds" in entry and not _is_number(entry["audio_seconds"]):
        raise bad(f"{where}: 'audio_seconds' is {entry['audio_seconds']!r}, expected a non-negative number")
    for key in PER_SAMPLE_KEYS:
        if key in entry and not lists:
            raise bad(f"{where} lists '{key}': a schema-{SCHEMA_VERSION} index keeps them in its sidecar")
        if entry.get(key) is not None:
            problem = _per_sample_problem(key, entry[key], entry["num_samples"])
            if problem:
                raise bad(f"{where} {problem}")
    return name


def _check_sidecar_entries(index: dict, bad) -> None:
    """A schema-2 index names its sidecar (a bare .npy name, its size, sha256 and rows) and a speaker table
    of distinct strings; the sidecar's contents are checked when it is loaded (shards.sample_table)."""
    desc = index.get("sample_table")
    if not isinstance(desc, dict):
        raise bad("'sample_table' (the per-sample sidecar) is missing or not an object")
    name = desc.get("file")
    if not isinstance(name, str) or not name.endswith(".npy") or bare_name_problem(name[:-4] + ".tar"):
        raise bad(f"sample_table.file {name!r} is not a bare .npy file name inside the index's directory")
    for key in ("bytes", "rows"):
        if not _is_count(desc.get(key)):
            raise bad(f"sample_table.{key} is {desc.get(key)!r}, expected a non-negative integer")
    if not isinstance(desc.get("sha256"), str) or not _SHA256.fullmatch(desc["sha256"]):
        raise bad(f"sample_table.sha256 is {desc.get('sha256')!r}, expected 64 lowercase hex digits")
    if desc["rows"] != index.get("num_samples"):
        raise bad(f"sample_table.rows is {desc['rows']}, num_samples {index.get('num_samples')!r}")
    table = index.get("speaker_table")
    if not isinstance(table, list) or not all(isinstance(s, str) for s in table):
        raise bad("'speaker_table' is missing or not a list of strings")
    if len(set(table)) != len(table):
        raise bad("'speaker_table' lists a speaker twice")


def validate_index(index, path) -> dict:
    """`index` (parsed index.json at `path`) if it has the schema the reader relies on, else ShardError."""

    def bad(what: str) -> ShardError:
        return ShardError(f"{path}: {what}; {INDEX_FIX}")

    if not isinstance(index, dict):
        raise bad(f"is a JSON {type(index).__name__}, not an object")
    if index.get("schema_version") not in READABLE_SCHEMAS:
        raise ShardError(
            f"{path} has schema {index.get('schema_version')!r}, this reader reads {READABLE_SCHEMAS}; "
            "rebuild the shards with this version of higgs-ds"
        )
    lists = index["schema_version"] == SCHEMA_LISTS
    _check_codec(index.get("codec"), bad)
    if not isinstance(index.get("shards"), list):
        raise bad("'shards' is missing or not a list")
    if not isinstance(index.get("build", {}), dict):
        raise bad("'build' is not an object")
    names: set[str] = set()
    for i, entry in enumerate(index["shards"]):
        name = _check_shard_entry(i, entry, bad, lists)
        if name in names:
            raise bad(f"shards[{i}].file {name!r} is listed twice")
        names.add(name)
    total = sum(entry["num_samples"] for entry in index["shards"])
    if index.get("num_samples") != total:
        raise bad(f"num_samples is {index.get('num_samples')!r}, its shards hold {total}")
    if not lists:
        _check_sidecar_entries(index, bad)
    elif "sample_table" in index:
        raise bad(f"names a 'sample_table', which a schema-{SCHEMA_LISTS} index does not have")
    return index


def parse_index(raw: bytes, path) -> dict:
    try:
        index = orjson.loads(raw)  # strict JSON: no NaN, bounded nesting
    except orjson.JSONDecodeError as err:
        raise ShardError(f"{path} is not valid JSON ({err}); {INDEX_FIX}") from None
    return validate_index(index, path)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def shard_file_problem(shard_dir, entry: dict) -> str | None:
    """Why the file an index entry names is not the shard it promises (missing, a symbolic link out of the
    directory, a device or fifo, another size), or None. Nothing is opened: a fifo or /dev/zero never is."""
    path = os.path.join(shard_dir, entry["file"])
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real, root = os.path.realpath(path), os.path.realpath(shard_dir)
            if os.path.commonpath([real, root]) != root:
                return f"is a symbolic link to {real}, outside {shard_dir}: a shard must be a file inside its directory"
            st = os.stat(path)
    except FileNotFoundError:
        return "is listed in index.json but missing: restore it, or rebuild it (`higgs-ds shards build ... --resume`)"
    if not stat.S_ISREG(st.st_mode):
        return f"is {_kind(st.st_mode)}, not a regular file: a shard must be a file written by `higgs-ds shards build`"
    if st.st_size != entry["bytes"]:
        return (
            f"has {st.st_size} bytes, its index.json says {entry['bytes']}: it was changed or cut short after "
            f"the build; restore it or {REBUILD}"
        )
    return None


def empty_shard_problem(path) -> str | None:
    """Why a shard its index lists with 0 samples is not empty (training never opens it, so a count of 0
    is checked here, by its first block, or samples would silently not be trained on), or None."""
    with open_regular(path) as f:
        first = f.read(BLOCK)
    if first and first != _ZERO_BLOCK:
        return f"holds tar members, its index.json says 0 samples; {INDEX_FIX}"
    return None


# ---------------------------------------------------------------- tar


def open_regular(path) -> BinaryIO:
    """`path` opened for reading if it is a regular file; a fifo is not waited on, a device not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ShardError(f"cannot open shard {path}: {err.strerror}; restore it or {REBUILD}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ShardError(f"{path} is {_kind(mode)}, not a regular file: a shard must be a file written by higgs-ds")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def _octal(block: bytes, start: int, end: int, what: str, path: str, pos: int) -> int:
    """A numeric header field: octal digits only, space-padded before, NUL/space-terminated after (what
    tarfile and GNU tar write). int(field, 8) alone would take '-1000', a size that never advances."""
    field = block[start:end]
    digits = field.rstrip(b" \0").lstrip(b" ")
    if digits.isdigit() and b"8" not in digits and b"9" not in digits:  # bytes.isdigit: ASCII 0-9 only
        return int(digits, 8)
    if field[0] & 0x80:
        raise ShardError(
            f"{path}: tar header at byte {pos}: its {what} is a base-256 number, which higgs-ds shards never "
            f"hold (members are far under 8 GiB); {REBUILD}"
        )
    raise ShardError(
        f"{path}: tar header at byte {pos}: its {what} field {field!r} is not an octal number (a corrupt "
        f"shard); {REBUILD}"
    )


def _checksum(block: bytes) -> int:
    return sum(block) - sum(block[148:156]) + 8 * ord(" ")  # the checksum field counts as spaces


def _checksum_error(where: str, stored: int, actual: int) -> ShardError:
    return ShardError(f"{where}: checksum {stored} does not match its bytes ({actual}): a corrupt shard; {REBUILD}")


def _check_checksums(path: str, headers: list[tuple[bytes, int, int]]) -> None:
    """Every (block, position, stored checksum) checked in one numpy sum: a Python sum per header was
    most of the cost of opening a shard."""
    if not headers:
        return
    blocks = np.frombuffer(b"".join(h[0] for h in headers), np.uint8).reshape(len(headers), BLOCK)
    actual = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    bad = np.flatnonzero(actual != np.array([h[2] for h in headers], np.int64))
    if bad.size:
        block, pos, stored = headers[int(bad[0])]
        raise _checksum_error(f"{path}: tar header at byte {pos}", stored, _checksum(block))


def _parse_header(block: bytes, pos: int, path: str, file_size: int) -> tuple[str, int, int]:
    """(member name, data size, stored checksum) of the ustar header `block` at byte `pos`, every field
    checked; the checksum itself is compared in batches by _check_checksums (here only when another field
    is wrong, so that damage is called a corrupt header rather than what the damage looks like)."""
    if block[257:265] != b"ustar\x0000":
        raise ShardError(
            f"{path}: tar header at byte {pos} is not a POSIX ustar header (higgs-ds shards are ustar tars); {REBUILD}"
        )
    stored = _octal(block, 148, 156, "checksum", path, pos)
    try:
        return (*_header_fields(block, pos, path, file_size), stored)
    except ShardError:
        if stored != _checksum(block):
            raise _checksum_error(f"{path}: tar header at byte {pos}", stored, _checksum(block)) from None
        raise


def _header_fields(block: bytes, pos: int, path: str, file_size: int) -> tuple[str, int]:
    kind = block[156:157]
    if kind not in (b"0", b"\0"):
        what = _TAR_TYPES.get(kind, f"a member of tar type {kind!r}")
        raise ShardError(
            f"{path}: tar header at byte {pos} is {what}; higgs-ds shards hold only regular files with plain "
            f"ustar headers (no pax/GNU extensions, links or devices); {REBUILD}"
        )
    size = _octal(block, 124, 136, "size", path, pos)
    raw = block[:100].split(b"\0", 1)[0]
    if block[345] != 0 or not raw.isascii():
        raise ShardError(
            f"{path}: tar header at byte {pos}: member name {raw!r} is not a plain ASCII KEY.json, "
            f"KEY.codes.npy or KEY.tokens.npy; {REBUILD}"
        )
    name = raw.decode("ascii")
    if pos + BLOCK + size > file_size:
        raise ShardError(
            f"{path}: member {name!r} at byte {pos} declares {size} bytes, past the end of the file "
            f"({file_size} bytes): the shard is cut short or corrupt; {REBUILD}"
        )
    return name, size


def scan_tar(path: str, spec: ShardSpec | None = None, trust_record: bool = False) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member: each header parsed strictly (its checksum too), each member
    inside the file, the next header after the member's data (the position always advances). With `spec`,
    the file's size is checked first and its sha256 in the same sequential read, and a sha256 mismatch is
    reported before any damage it explains. With `trust_record` too, a file this machine already hashed
    (shards.verified: same realpath, inode, size, mtime and ctime) is not hashed again: only its headers
    are read, one seek each; a file that hashes right is recorded."""
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        if spec is not None and st.st_size != spec.size:
            raise ShardError(
                f"{path} has {st.st_size} bytes, its index.json says {spec.size}: it was changed or cut short "
                f"after the build; restore it or {REBUILD}"
            )
        key = verified.shard_key(path, st, spec.sha256, spec.size) if spec is not None and trust_record else None
        if key is not None and verified.is_verified(key):
            return _scan_headers(f, path, st.st_size)
        members = _scan_hashing(f, path, st.st_size, spec)
        if key is not None and _signature(os.fstat(f.fileno())) == _signature(st):
            verified.record_verified(key)
    return members


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _scan_headers(f: BinaryIO, path: str, file_size: int) -> list[tuple[str, int, int]]:
    """The members of a file already hashed: one 512-byte read per header, the data skipped."""
    fd, members, headers, header, done = f.fileno(), [], [], 0, False
    while header + BLOCK <= file_size:
        block = os.pread(fd, BLOCK, header)
        if len(block) != BLOCK:
            raise ShardError(f"{path} changed size while it was read; restore it or {REBUILD}")
        if block == _ZERO_BLOCK:
            done = True  # the end-of-archive marker
            break
        try:
            name, size, stored = _parse_header(block, header, path, file_size)
        except ShardError:
            _check_checksums(path, headers)  # an earlier corrupt header is the first problem
            raise
        headers.append((block, header, stored))
        members.append((name, header + BLOCK, size))
        header += BLOCK + -(-size // BLOCK) * BLOCK
    _check_checksums(path, headers)
    if not done and header != file_size:
        raise ShardError(f"{path} is cut short inside the tar header at byte {header}; {REBUILD}")
    return members


def _scan_hashing(f: BinaryIO, path: str, file_size: int, spec: ShardSpec | None) -> list[tuple[str, int, int]]:
    """The members, in one sequential read of the whole file that also hashes it (with `spec`)."""
    hasher = hashlib.sha256() if spec is not None else None
    members: list[tuple[str, int, int]] = []
    problem: ShardError | None = None
    window, start, header, done, read = b"", 0, 0, False, 0  # window: the file's bytes from `start` on
    while chunk := f.read(CHUNK):
        read += len(chunk)
        if hasher is not None:
            hasher.update(chunk)
        if done:
            if hasher is None:
                break
            continue
        window = window + chunk if window else chunk
        headers: list[tuple[bytes, int, int]] = []
        try:
            while not done and header + BLOCK <= start + len(window):
                block = window[header - start : header - start + BLOCK]
                if block == _ZERO_BLOCK:
                    done = True  # the end-of-archive marker
                    break
                name, size, stored = _parse_header(block, header, path, file_size)
                headers.append((block, header, stored))
                members.append((name, header + BLOCK, size))
                header += BLOCK + -(-size // BLOCK) * BLOCK
        except ShardError as err:
            problem, done = err, True
        try:
            _check_checksums(path, headers)  # an earlier corrupt header is the first problem
        except ShardError as err:
            problem, done = err, True
        keep = min(header - start, len(window))  # less than a block is carried into the next chunk
        window, start = window[keep:], start + keep
    if hasher is not None and read != file_size:
        raise ShardError(f"{path} changed size while it was read; restore it or {REBUILD}")
    if hasher is not None and hasher.hexdigest() != spec.sha256:
        raise ShardError(
            f"{path}: its sha256 differs from its index.json: the file changed after the build; restore it or {REBUILD}"
        )
    if problem is not None:
        raise problem
    if not done and header != file_size:
        raise ShardError(f"{path} is cut short inside the tar header at byte {header}; {REBUILD}")
    return members


def group_samples(path: str, members) -> tuple[tuple[tuple[str, str, int, int], ...], ...]:
    """Per sample, its members as (name, suffix, data offset, size): exactly one KEY.json, one KEY.codes.npy
    and at most one KEY.tokens.npy, adjacent, each key once."""
    samples: list[list] = []
    seen: set[str] = set()
    current = None
    for name, offset, size in members:
        key, _, suffix = name.partition(".")
        if suffix not in MEMBER_TYPES or not (key.isdigit() or _KEY.fullmatch(key)):  # the builder's keys: digits
            raise ShardError(
                f"{path}: unexpected member {name!r}; higgs-ds shards hold only KEY.json, KEY.codes.npy and "
                f"KEY.tokens.npy members; {REBUILD}"
            )
        if key != current:
            if key in seen:
                raise ShardError(f"{path}: sample key {key!r} appears twice (a hand-made or merged shard); {REBUILD}")
            seen.add(key)
            samples.append([])
            current = key
        samples[-1].append((name, suffix, offset, size))
    for sample in samples:
        if sorted(m[1] for m in sample) not in SAMPLE_MEMBERS:
            raise ShardError(
                f"{path}: sample {sample[0][0].partition('.')[0]!r} has members {[m[0] for m in sample]}, "
                f"a higgs-ds sample has exactly one KEY.json and one KEY.codes.npy, and at most one "
                f"KEY.tokens.npy (a truncated or hand-made shard); {REBUILD}"
            )
    return tuple(tuple(sample) for sample in samples)


# ---------------------------------------------------------------- members


def _npy_header(data: bytes, where: str) -> tuple[int, int]:
    """(start of the header's dict, start of the array data) of a .npy member, from its magic and version."""
    if data[:6] != b"\x93NUMPY":
        raise ShardError(f"{where} is not a .npy array (an .npz archive or another format); {REBUILD}")
    if data[6:8] == b"\x01\x00":
        return 10, 10 + int.from_bytes(data[8:10], "little")
    if data[6:8] in (b"\x02\x00", b"\x03\x00"):
        return 12, 12 + int.from_bytes(data[8:12], "little")
    raise ShardError(f"{where}: unknown .npy format version {tuple(data[6:8])}; {REBUILD}")


def npy_data_offset(data: bytes, where: str) -> int:
    """Where the array data of a .npy member starts (its header's length)."""
    return _npy_header(data, where)[1]


def decode_codes(data: bytes, where: str) -> np.ndarray:
    """The (K, T) uint16 array of a .codes.npy member, a view of `data`: the header must be the one np.save
    writes for a C-order '<u2' 2-D array, and its shape must account for exactly the member's bytes, which
    is checked before anything is allocated (np.load would allocate a declared 16 TiB first)."""
    head, start = _npy_header(data, where)
    m = _NPY_HEADER.fullmatch(data, head, start)
    if m is None or len(data) < start:
        raise ShardError(
            f"{where}: its .npy header {bytes(data[10 : min(start, 200)])!r} is not the one of a C-order 2-D "
            f"'<u2' (uint16) array, the only codes higgs-ds writes (never an object array or pickle); {REBUILD}"
        )
    rows, cols = int(m.group(1)), int(m.group(2))
    if not 0 < rows <= MAX_CODEBOOKS or cols >= 1 << 31:  # (0, 10**19) would hold 0 bytes and pass below
        raise ShardError(
            f"{where}: its .npy header declares shape ({rows}, {cols}): codes have 1-{MAX_CODEBOOKS} codebook rows "
            f"and fewer than 2**31 frames; {REBUILD}"
        )
    if len(data) - start != 2 * rows * cols:
        raise ShardError(
            f"{where}: its .npy header declares shape ({rows}, {cols}), {2 * rows * cols} bytes, the member "
            f"holds {len(data) - start}; {REBUILD}"
        )
    return np.frombuffer(data, "<u2", rows * cols, start).reshape(rows, cols)


def decode_tokens(data: bytes, where: str) -> np.ndarray:
    """The (2, n) int32 array of a .tokens.npy member (row 0 input ids, row 1 label ids), a view of `data`,
    held to the header np.save writes for it and to exactly the member's bytes, as decode_codes is."""
    head, start = _npy_header(data, where)
    m = _TOKENS_HEADER.fullmatch(data, head, start)
    if m is None or len(data) < start:
        raise ShardError(
            f"{where}: its .npy header {bytes(data[10 : min(start, 200)])!r} is not the one of a C-order (2, n) "
            f"'<i4' (int32) array, the only token ids higgs-ds writes (never an object array or pickle); {REBUILD}"
        )
    n = int(m.group(1))
    if not 0 < n < 1 << 31 or len(data) - start != 8 * n:
        raise ShardError(
            f"{where}: its .npy header declares shape (2, {n}), {8 * n} bytes, the member holds "
            f"{len(data) - start} (a sample has 1 to 2**31 - 1 tokens); {REBUILD}"
        )
    return np.frombuffer(data, "<i4", 2 * n, start).reshape(2, n)


def decode_json(data: bytes, where: str) -> dict:
    try:
        meta = orjson.loads(data)  # strict UTF-8 JSON; several times faster than json on token id lists
    except orjson.JSONDecodeError as err:
        raise ShardError(f"{where} is not valid UTF-8 JSON ({err}); {REBUILD}") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{where} is a JSON {type(meta).__name__}, a higgs-ds sample is an object; {REBUILD}")
    return meta


def _check_ids(meta: dict, vocab_size: int | None, bad) -> tuple[np.ndarray, np.ndarray]:
    """Stored token ids: two equally long lists of integers, ids in [0, vocab), labels -100 or in [0, vocab).
    They are checked as the int64 arrays the encoder needs, returned for it (the JSON keeps its lists), so the
    check costs about what the conversion alone did."""
    ids, labels = meta.get("input_ids"), meta.get("label_ids")
    if type(ids) is not list or type(labels) is not list or not ids or len(ids) != len(labels):
        raise bad("'input_ids' and 'label_ids' must be two non-empty lists of the same length")
    try:  # no dtype given: a float, string, list or an int beyond int64 makes another dtype, or fails
        ids_arr, labels_arr = np.array(ids), np.array(labels)
    except (ValueError, OverflowError):
        ids_arr = labels_arr = None
    arrays = (ids_arr, labels_arr)
    if ids_arr is None or any(a.dtype != np.int64 or a.ndim != 1 for a in arrays):
        raise bad("'input_ids' and 'label_ids' must hold integers")
    return _check_id_range(ids_arr, labels_arr, vocab_size, bad)


def _check_id_range(ids: np.ndarray, labels: np.ndarray, vocab_size: int | None, bad) -> tuple:
    """(ids, labels) if every id is in [0, vocab) and every label -100 or in [0, vocab), else bad(...)."""
    top = vocab_size if vocab_size is not None else 1 << 63
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= top:
        raise bad(f"token id {low if low < 0 else high} is outside the tokenizer's vocabulary [0, {top})")
    trained = labels[labels != -100]
    if trained.size and (int(trained.min()) < 0 or int(trained.max()) >= top):
        raise bad(f"label ids must be -100 or token ids in [0, {top})")
    return ids, labels


def _check_meta(meta: dict, where: str, vocab_size: int | None) -> tuple[list[int], tuple | None]:
    """The sample's fields that training reads, with their types; returns the frames of its audio items and
    its stored token ids as int64 arrays (None when it stores none)."""

    def bad(what: str) -> ShardError:
        return ShardError(f"{where}: {what}; {REBUILD}")

    try:
        check_chatml(meta)  # the builder's own ChatML checks: what boson's prepare_chatml_sample needs
    except BadSample as err:
        raise bad(str(err)) from None
    if type(meta.get("id")) is not str:
        raise bad("'id' (the sample id) is missing or not a string")
    audio = meta.get("audio")
    if type(audio) is not list:
        raise bad("'audio' (the frames and seconds of each audio item) is missing or not a list")
    frames = []
    for item in audio:
        if type(item) is not dict or not _is_count(item.get("frames")) or not _is_number(item.get("seconds")):
            raise bad("every 'audio' item needs an integer 'frames' >= 0 and a number 'seconds' >= 0")
        frames.append(item["frames"])
    in_messages = sum(1 for _ in audio_items(meta["messages"]))
    if len(audio) != in_messages:
        raise bad(f"'audio' lists {len(audio)} items, the messages hold {in_messages}")
    for key in ("target_frames", "expanded_length"):
        if key in meta and not _is_count(meta[key]):
            raise bad(f"'{key}' is {meta[key]!r}, expected a non-negative integer")
    parts = meta.get("clone_parts")
    if parts is not None and not _is_parts(parts):
        raise bad(f"'clone_parts' is {parts!r}, expected [head, pair] or null")
    if "v3" in meta:
        _check_v3_meta(meta["v3"], bad)
    ids = _check_ids(meta, vocab_size, bad) if "input_ids" in meta or "label_ids" in meta else None
    return frames, ids


def _is_parts(parts) -> bool:
    return type(parts) is list and len(parts) == 2 and all(p is None or _is_count(p) for p in parts)


def _check_v3_meta(v3, bad) -> None:
    """A sample's "v3" lengths (shards.lengths): {"expanded_length": count or null, "clone_parts": null or
    [head, pair] counts, only beside a length}."""
    if type(v3) is not dict or set(v3) != {"expanded_length", "clone_parts"}:
        raise bad(f"'v3' is {str(v3)[:100]}, expected {{'expanded_length': ..., 'clone_parts': ...}}")
    length, parts = v3["expanded_length"], v3["clone_parts"]
    if not (length is None or _is_count(length)):
        raise bad(f"'v3.expanded_length' is {length!r}, expected a non-negative integer or null")
    if parts is not None and (length is None or not _is_parts(parts) or None in parts):
        raise bad(f"'v3.clone_parts' is {parts!r}, expected [head, pair] beside a v3 length, or null")


def _bad_at(where: str):
    return lambda what: ShardError(f"{where}: {what}; {REBUILD}")


def check_sample(record: dict, path: str, names: dict, limits: SampleLimits) -> None:
    """Raise ShardError naming shard and member unless the decoded sample is one training can use: its JSON
    has the fields and types training reads (token ids inside the vocabulary), its codes have
    `num_codebooks` rows, every code < `codebook_size`, and as many frames as its audio items. Sets
    record["token_ids"]: its stored (input_ids, label_ids) as checked integer arrays (int32 from a
    KEY.tokens.npy member, int64 from an older shard's JSON lists), or None."""
    frames, record["token_ids"] = _check_meta(record["json"], f"{path}: member {names['json']!r}", limits.vocab_size)
    if "tokens" in record:
        where = f"{path}: member {names['tokens']!r}"
        if record["token_ids"] is not None:
            raise ShardError(f"{where}: the sample's JSON holds token ids too (a hand-made shard); {REBUILD}")
        tokens = record["tokens"]
        record["token_ids"] = _check_id_range(tokens[0], tokens[1], limits.vocab_size, _bad_at(where))
    codes, where = record["codes"], f"{path}: member {names['codes']!r}"
    if limits.num_codebooks is not None and codes.shape[0] != limits.num_codebooks:
        raise ShardError(
            f"{where}: codes have {codes.shape[0]} rows, the codec has {limits.num_codebooks} codebooks; {REBUILD}"
        )
    if codes.shape[1] != sum(frames):
        raise ShardError(f"{where}: codes hold {codes.shape[1]} frames, its audio items {sum(frames)}; {REBUILD}")
    if limits.codebook_size is not None and codes.size and int(codes.max()) >= limits.codebook_size:
        raise ShardError(
            f"{where}: code {int(codes.max())} >= the codebook size {limits.codebook_size}; {REBUILD} "
            "with the codec its index.json names"
        )
