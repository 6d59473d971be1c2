"""Writes that survive a crash or a full disk, a lock per output directory, and secrets kept out of files.

Every file higgs-ds publishes (shards, index.json, data states, exports, configs) goes through here:

- `atomic_write_bytes/text/json(path, ...)`: write to a temp file in the same directory whose name cannot
  collide (pid + random), flush + fsync it, rename it over `path`, fsync the directory. A reader sees the old
  file or the whole new one, never a torn one, and a power cut after the call returns loses nothing.
- `publish(tmp, final)`: the same last step for a file that was streamed into `tmp` (a shard being written).
- `DirLock(dir, name)`: an exclusive `flock` on `dir/name` held for a whole build; a second builder of the same
  directory (or slice) fails at once with the holder's pid and host instead of interleaving its writes.
  The kernel drops the lock when the process dies, so a killed build never leaves a stale lock behind.
- `redact(obj)`: a copy of a config with token/key/secret/password values replaced, for every config that is
  written to a checkpoint, a log or a model card.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import stat
from pathlib import Path

from higgs_ds.errors import UserError

REDACTED = "<redacted>"

# Keys whose value is a credential: `hub_token`, `use_auth_token`, `api_key`, `wandb_api_key`, `secret`,
# `password`, `aws_secret_access_key`... Matched on `_`-separated words, so `max_tokens`/`target_tokens`
# (counts) and `tokenizer` (a path) are not.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "credential", "credentials", "apikey", "auth"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}
# Values that are credentials whatever their key: Hugging Face, OpenAI-style, GitHub, AWS access key ids.
_SECRET_VALUE = re.compile(
    r"\b(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[A-Z0-9]{16})\b"
)


def is_secret_key(key: str) -> bool:
    words = [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _redact_string(text: str) -> str:
    flag = re.fullmatch(r"(--?[A-Za-z0-9_.-]+)=(.*)", text, re.S)  # "--hub_token=hf_..." in an argv
    if flag and is_secret_key(flag.group(1)) and flag.group(2):
        return f"{flag.group(1)}={REDACTED}"
    return _SECRET_VALUE.sub(REDACTED, text)


def _is_value(v) -> bool:
    """A credential's value: anything but unset/empty and switches (`use_auth_token = true` is no secret)."""
    return not (v is None or isinstance(v, bool) or v == "" or v == [] or v == {})


def redact(obj):
    """A copy of `obj` (dicts, lists, strings) with every credential value replaced by '<redacted>'."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and _is_value(v) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out, hide_next = [], False
        for item in obj:  # an argv: ["--hub_token", "hf_..."]
            if hide_next and isinstance(item, str):
                out.append(REDACTED)
            else:
                out.append(redact(item))
            hide_next = isinstance(item, str) and item.startswith("-") and "=" not in item and is_secret_key(item)
        return type(obj)(out) if isinstance(obj, tuple) else out
    if isinstance(obj, str):
        return _redact_string(obj)
    return obj


def temp_path(path: str | os.PathLike) -> Path:
    """A temp name beside `path` that no other process or thread picks: pid + 64 random bits."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems (and /dev/shm) refuse fsync on a directory
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Every file and folder under `root` on disk, before the rename that publishes it."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """fsync `tmp`, rename it to `final`, fsync the directory: `final` is then durable and whole."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
    return Path(final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


class DirLock:
    """`with DirLock(out_dir, ".build.lock"):` holds an exclusive lock on that file for the block."""

    def __init__(self, directory: str | os.PathLike, name: str = ".higgs-ds.lock", what: str = "build"):
        self.path = Path(directory) / name
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a planted symlink: the pid written below would overwrite its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise UserError(f"{self.path} cannot be used as a lock file ({err}): remove it, it is not ours") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{self.path} is not a regular file: remove it, it is not a higgs-ds lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{self.path} is locked by {holder}: another {self.what} is writing to {self.path.parent}; "
                "wait for it to finish or stop it (the lock is released when that process exits)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
