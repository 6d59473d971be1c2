"""The training stream's fast path: samples of shards this machine has checked whole (higgs_ds.shards.checked).

    samples = read_encoded(refs, batch, vocab_size)   # list[EncodedSample], or None: take the strict path

For a shard whose file version was checked whole under the same limits, a sample is one read of its span
and two views into it (token ids, codes): no tar headers walked, no JSON decoded, no per-sample checks. The
samples equal what read_positions + SampleEncoder(stored_tokens=True) give for the same positions (tested
on every batch of an epoch), because the table is made from exactly that path's decoded, checked samples.

A shard is checked whole by the first process on the machine to open it that gets its lock: it reads the
shard the strict way (sha256, headers, every sample decoded and checked) and records the table; processes
that find the lock held read that shard the strict way meanwhile, never wait. After a batch's reads, each
of its files is fstat'ed: a file written to since its table was made (its ctime moved) sends the batch, and
the shard from then on, down the strict path, which checks what the bytes now are.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict

import numpy as np

from higgs_ds.shards import checked, verified
from higgs_ds.shards.format import INDEX_FIX, ShardError, npy_data_offset, open_regular
from higgs_ds.stream.reader import decode_sample, member_table, shard_promise, with_vocab
from higgs_ds.stream.tokens import EncodedSample

MAX_OPEN = 64  # checked shards kept open per process, as many as member tables (a descriptor and ~0.3 MB each)


class _Open:
    """A checked shard held open: the descriptor its table describes, the table as Python lists."""

    __slots__ = ("fd", "signature", "rows", "item_frames", "ids")

    def __init__(self, fd: int, signature: tuple, table: checked.CheckedTable):
        self.fd, self.signature = fd, signature
        self.rows, self.item_frames, self.ids = table.rows.tolist(), table.item_frames.tolist(), table.ids


# (path, vocab_size) -> _Open, or None: no table for it in this process (strict path)
_OPEN: OrderedDict = OrderedDict()


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def clear() -> None:
    """Forget every open checked shard (tests; a new dataloader worker starts empty the same way)."""
    for entry in _OPEN.values():
        if entry is not None:
            os.close(entry.fd)
    _OPEN.clear()


def _drop(where) -> None:
    entry = _OPEN.pop(where, None)
    if entry is not None:
        os.close(entry.fd)
    _OPEN[where] = None  # this file version is read the strict way from now on in this process


def opened(path: str, vocab_size: int | None) -> _Open | None:
    where = (path, vocab_size)
    if where in _OPEN:
        _OPEN.move_to_end(where)
        return _OPEN[where]
    entry = _open(path, vocab_size)
    _OPEN[where] = entry
    while len(_OPEN) > MAX_OPEN:
        _, old = _OPEN.popitem(last=False)
        if old is not None:
            os.close(old.fd)
    return entry


def _open(path: str, vocab_size: int | None) -> _Open | None:
    """The checked table of `path` (made now when none is recorded and this process gets its lock); None:
    the strict path reads it (and names any problem the file has)."""
    if not verified.trust_records():
        return None
    spec, limits = shard_promise(path)
    if spec is None:
        return None
    limits = with_vocab(limits, vocab_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    table = None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == spec.size:
            key = checked.table_key(
                verified.shard_key(path, st, spec.sha256, spec.size),
                limits.num_codebooks,
                limits.codebook_size,
                limits.vocab_size,
            )
            table = checked.load(key, spec.num_samples) or _check_whole(path, key, limits, st)
    except (OSError, ShardError):
        table = None  # a bad sample is named by the strict path when training reaches it, as before
    finally:
        if table is None:
            os.close(fd)
    return None if table is None else _Open(fd, _signature(st), table)


def _check_whole(path: str, key: dict, limits, st: os.stat_result) -> checked.CheckedTable | None:
    """Read the shard the strict way, every sample decoded and checked, and record its table; None when
    another process is checking it, a sample stores no token ids member, or the file changed meanwhile."""
    lock = checked.try_lock(key)
    if lock is None:
        return None
    try:
        table = _strict_table(path, limits)
        if table is not None and _signature(os.stat(path)) == _signature(st):
            checked.store(key, table)
            return table
        return None
    finally:
        os.close(lock)


def _strict_table(path: str, limits) -> checked.CheckedTable | None:
    rows, item_frames, ids = [], [], []
    with open_regular(path) as f:
        for members in member_table(path):
            first = members[0][2]
            end = members[-1][2] + members[-1][3]
            f.seek(first)
            span = f.read(end - first)
            record = decode_sample(path, members, span, first, limits)  # strict
            if "tokens" not in record:
                return None  # ids in the JSON (an older shard): the strict path reads it
            at = {suffix: (offset - first, size) for _, suffix, offset, size in members}

            def data_offset(suffix: str) -> int:
                o, size = at[suffix]
                return o + npy_data_offset(span[o : o + size], f"{path}: {suffix}")

            frames = [item["frames"] for item in record["json"]["audio"]]
            rows.append(
                [
                    first,
                    -(-(end - first) // checked.SPAN_ALIGN) * checked.SPAN_ALIGN,
                    data_offset("tokens.npy"),
                    record["tokens"].shape[1],
                    data_offset("codes.npy"),
                    *record["codes"].shape,
                    len(item_frames),
                    len(frames),
                ]
            )
            item_frames += frames
            ids.append(record["json"]["id"])
    return checked.CheckedTable(np.array(rows, np.int64), np.array(item_frames, np.int64), tuple(ids))


def read_encoded(refs, positions, vocab_size: int | None) -> list[EncodedSample] | None:
    """The EncodedSamples at `positions` (in order) when every shard they are in is checked, else None."""
    shards = {}
    for s, _ in positions:
        if s not in shards:
            entry = opened(refs[s].path, vocab_size)
            if entry is None or len(entry.rows) != refs[s].num_samples:
                return None
            shards[s] = entry
    samples = []
    for s, i in positions:
        entry = shards[s]
        start, length, tok, n, codes, k, t, first, count = entry.rows[i]
        data = os.pread(entry.fd, length, start)
        if len(data) != length:
            raise ShardError(f"{refs[s].path} is cut short (the file changed after it was opened); {INDEX_FIX}")
        ids = np.frombuffer(data, "<i4", 2 * n, tok).astype(np.int64)
        codes_view = np.frombuffer(data, "<u2", k * t, codes).reshape(k, t)
        frames = entry.item_frames[first : first + count]
        samples.append(EncodedSample(entry.ids[i], ids[:n], ids[n:], codes_view, frames))
    for s, entry in shards.items():  # written to since it was checked: what was read may not be what was checked
        if _signature(os.fstat(entry.fd)) != entry.signature:
            _drop((refs[s].path, vocab_size))
            return None
    return samples
