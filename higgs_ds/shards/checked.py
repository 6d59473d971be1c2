"""Shards this machine has decoded and checked whole: where each sample's token ids and codes lie.

Training's reader checks every sample it reads (higgs_ds.shards.format.check_sample) and finds its
members by walking the shard's tar headers; both are most of what a sample costs, and every dataloader
worker of every epoch pays them again for the same bytes. With DataConfig.verify_shards = "once", the first
process on a machine to open a shard file version reads it whole, checks its sha256 and every sample as
training would, and records here what it found; later opens of that file version, by any process, read
the record instead and take each sample with one read and no decoding of its JSON.

A record is the verified-shards key (realpath, device, inode, size, mtime, ctime, the index's sha256 and
size: shards.verified), the limits the samples were checked against (codebooks, codebook size, vocabulary
size: another tokenizer's vocabulary is checked again), the sample ids, and the sha256 of a table file:

    per sample (int64): the span to read (offset, length), and inside it the token ids (offset, count) and
    the codes (offset, rows, frames); then, flat, the frame count of each audio item (ITEM_* columns)

Records live in the verified-shards cache folder (this user's only), written atomically, table first. Like a
verified-shards record, one that cannot be read, is not what this module writes or does not match its key
is "not checked" (the shard is read the strict way), never an error. Only shards whose every sample stores
its token ids as a KEY.tokens.npy member get a table (older shards keep the strict path).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from dataclasses import dataclass

import numpy as np
import orjson

from higgs_ds.safe_io import atomic_write_bytes
from higgs_ds.shards import verified

RECORD_VERSION = 1
# the columns of a table row
SPAN_START, SPAN_LEN, TOK_OFF, TOK_N, CODES_OFF, ROWS, FRAMES, ITEM_START, ITEM_COUNT = range(9)
COLUMNS = 9
MAX_RECORD_BYTES = 64 << 20  # the ids of a few hundred thousand samples; anything larger is not ours
SPAN_ALIGN = 8  # spans are read in multiples of 8 bytes (the tar pads every member to 512)


@dataclass(frozen=True)
class CheckedTable:
    """One checked shard: `rows` (n, COLUMNS) int64, `item_frames` (total items,) int64, `ids` per sample."""

    rows: np.ndarray
    item_frames: np.ndarray
    ids: tuple

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def to_bytes(self) -> bytes:
        return self.rows.astype("<i8").tobytes() + self.item_frames.astype("<i8").tobytes()


def table_key(verified_key: dict, num_codebooks, codebook_size, vocab_size) -> dict:
    return {**verified_key, "limits": [num_codebooks, codebook_size, vocab_size]}


def _paths(key: dict) -> tuple[str, str]:
    name = hashlib.sha256(orjson.dumps(key, option=orjson.OPT_SORT_KEYS)).hexdigest()
    folder = verified.cache_dir()
    return str(folder / f"{name}.checked.json"), str(folder / f"{name}.checked.table")


def _read_private(path: str, limit: int) -> bytes | None:
    """The bytes of a regular file (no symlink followed) of at most `limit` bytes, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def load(key: dict, num_samples: int) -> CheckedTable | None:
    """The table recorded for `key` (a file version checked under its limits) if it is intact and holds
    `num_samples` samples; None otherwise."""
    if not verified.private_cache():
        return None
    record_path, table_path = _paths(key)
    raw = _read_private(record_path, MAX_RECORD_BYTES)
    try:
        record = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    if type(record) is not dict or set(record) != {"version", "key", "samples", "items", "ids", "table_sha256"}:
        return None
    n, items, ids = record["samples"], record["items"], record["ids"]
    if record["version"] != RECORD_VERSION or record["key"] != key or not verified.same_types(record["key"], key):
        return None
    if type(n) is not int or n != num_samples or type(items) is not int or items < 0:
        return None
    if type(ids) is not list or len(ids) != n or not all(type(i) is str for i in ids):
        return None
    table = _read_private(table_path, 8 * (n * COLUMNS + items))
    if table is None or len(table) != 8 * (n * COLUMNS + items):
        return None
    if hashlib.sha256(table).hexdigest() != record["table_sha256"]:
        return None
    values = np.frombuffer(table, "<i8")
    rows, item_frames = values[: n * COLUMNS].reshape(n, COLUMNS), values[n * COLUMNS :]
    if not _consistent(rows, item_frames, key["st_size"]):
        return None
    return CheckedTable(rows, item_frames, tuple(ids))


def _consistent(rows: np.ndarray, item_frames: np.ndarray, file_size: int) -> bool:
    """Every span lies inside the file, every member inside its span, every span's items inside the item
    list, frames add up: a table that is not one store() wrote never sizes a read or indexes a buffer."""
    if len(rows) == 0:
        return False
    start, length = rows[:, SPAN_START], rows[:, SPAN_LEN]
    tok, n, codes = rows[:, TOK_OFF], rows[:, TOK_N], rows[:, CODES_OFF]
    k, t, first, count = rows[:, ROWS], rows[:, FRAMES], rows[:, ITEM_START], rows[:, ITEM_COUNT]
    ok = (start >= 0) & (length > 0) & (length % SPAN_ALIGN == 0) & (start + length <= file_size)
    ok &= (n > 0) & (k > 0) & (t >= 0)
    ok &= (tok >= 0) & (tok % 4 == 0) & (tok + 8 * n <= length)
    ok &= (codes >= 0) & (codes % 2 == 0) & (codes + 2 * k * t <= length)
    ok &= (count >= 0) & (first >= 0) & (first + count <= len(item_frames))
    if not ok.all() or (item_frames < 0).any() or int(count.sum()) != len(item_frames):
        return False
    ends = np.concatenate(([0], np.cumsum(item_frames)))
    return bool((ends[first + count] - ends[first] == t).all())


def try_lock(key: dict):
    """An open lock file held exclusively for checking the shard of `key`, or None when another process
    holds it (it is checking that shard now: read the strict way meanwhile) or the cache is unusable."""
    record_path, _ = _paths(key)
    try:
        verified.cache_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
        if not verified.private_cache():
            return None
        fd = os.open(record_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def store(key: dict, table: CheckedTable) -> None:
    """Record `table` for `key`; an unwritable cache leaves the shard on the strict path (no error)."""
    if verified.too_recent(key):
        return
    record_path, table_path = _paths(key)
    data = table.to_bytes()
    record = {
        "version": RECORD_VERSION,
        "key": key,
        "samples": table.num_samples,
        "items": len(table.item_frames),
        "ids": list(table.ids),
        "table_sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        atomic_write_bytes(table_path, data)
        atomic_write_bytes(record_path, orjson.dumps(record))
    except OSError:
        pass
