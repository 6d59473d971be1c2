"""Which shard files this machine has already hashed: one small record per shard in a per-user cache.

Hashing a whole shard is most of what opening it costs, and every dataloader worker of every epoch opens
every shard it reads. A shard whose sha256 once matched its index.json is recorded here, keyed by what
identifies that version of the file on this machine:

    realpath, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, and the index's sha256 and size

st_ctime changes on every write and on every `touch`/utime, and no user can set it back, so a file changed
in any way after it was hashed no longer matches its record and is hashed again. The records live in
$HIGGS_DS_CACHE, else $XDG_CACHE_HOME/higgs-ds, else ~/.cache/higgs-ds, folder verified-shards/ (0700),
one JSON file per shard named by the sha256 of its key, written atomically only after a hash matched.

A record is only data: one that cannot be read, is not the JSON this module writes, or names another key is
"not verified" (the shard is hashed again), never an error. An unwritable cache hashes every time (logged
once). The mode "always" (DataConfig.verify_shards) ignores the records; `shards verify` always hashes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from pathlib import Path

import orjson

from higgs_ds.safe_io import atomic_write_bytes

MODES = ("once", "always")
RECORD_VERSION = 1
SETTLE_NS = 2_000_000_000  # see record_verified
MAX_RECORD_BYTES = 8192  # a record is ~400 bytes; anything larger is not one of ours

_log = logging.getLogger(__name__)
_state = {"mode": "once", "warned": False}


def set_mode(mode: str) -> None:
    """Mode "once": trust a matching record; "always": hash every shard at every open (this process and the
    workers it forks)."""
    if mode not in MODES:
        raise ValueError(f"verify mode {mode!r}: expected one of {MODES}")
    _state["mode"] = mode


def trust_records() -> bool:
    return _state["mode"] == "once"


def cache_dir() -> Path:
    base = os.environ.get("HIGGS_DS_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "higgs-ds") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "higgs-ds")
    return Path(base) / "verified-shards"


def shard_key(path: str, st: os.stat_result, sha256: str, size: int) -> dict:
    """What a record must name to vouch for the file `path` whose (f)stat is `st`."""
    return {
        "path": os.path.realpath(path),
        "st_dev": st.st_dev,
        "st_ino": st.st_ino,
        "st_size": st.st_size,
        "st_mtime_ns": st.st_mtime_ns,
        "st_ctime_ns": st.st_ctime_ns,
        "sha256": sha256,
        "size": size,
    }


def _record_path(key: dict) -> Path:
    name = hashlib.sha256(orjson.dumps(key, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return cache_dir() / f"{name}.json"


def _private(folder: Path) -> bool:
    """The cache folder is this user's and nobody else can write to it (else its records are not trusted)."""
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def private_cache() -> bool:
    """The cache folder exists, is this user's, and nobody else can write to it."""
    return _private(cache_dir())


def same_types(stored: dict, key: dict) -> bool:
    """A stored key's values have the types of `key`'s (1.0 == 1 would match otherwise)."""
    return _same_types(stored, key)


def too_recent(key: dict) -> bool:
    """The file of `key` changed less than SETTLE_NS ago: not to be recorded (see record_verified)."""
    return time.time_ns() - key["st_ctime_ns"] < SETTLE_NS


def is_verified(key: dict) -> bool:
    """True only when the record for `key` is a regular file holding exactly {"version": 1, "key": key},
    in a cache folder only this user can write to."""
    if not _private(cache_dir()):
        return False
    try:
        fd = os.open(_record_path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        raw = os.read(fd, MAX_RECORD_BYTES + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(raw) > MAX_RECORD_BYTES:
        return False
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    # == on plain JSON values: a float 1.0 for an int field or a list for a string does not match
    return (
        type(record) is dict and record == {"version": RECORD_VERSION, "key": key} and _same_types(record["key"], key)
    )


def _same_types(stored: dict, key: dict) -> bool:
    return all(type(stored[k]) is type(v) for k, v in key.items())


def record_verified(key: dict) -> None:
    """Remember that the file of `key` hashed to its index's sha256; an unwritable cache is logged once.
    A file changed less than SETTLE_NS ago is not recorded: file times tick in coarse steps (a jiffy), so a
    write right after this hash could leave mtime and ctime as they were (git's "racy" index entries)."""
    if too_recent(key):
        return
    folder = cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(_record_path(key), orjson.dumps({"version": RECORD_VERSION, "key": key}))
    except OSError as err:
        if not _state["warned"]:
            _state["warned"] = True
            _log.warning(
                "cannot record verified shards in %s (%s): every shard is hashed at each open; set "
                "HIGGS_DS_CACHE to a writable directory to hash each shard once",
                folder,
                err.strerror or err,
            )
