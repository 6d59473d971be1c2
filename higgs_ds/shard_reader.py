"""Stage 5 of the data flow: shard directories -> this rank's and this worker's raw samples.

Which samples a rank and worker read is decided by higgs_ds.epoch_plan; this module reads them: a run of
positions in one shard is read in one sequential pass over that shard (tarfile seeks over the rest).

Only the two member types the builder writes are decoded: `.json` (UTF-8 JSON) and `.codes.npy`
(numpy without pickle). Anything else in a shard is an error naming the shard and the member.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from higgs_ds.epoch_plan import ShardRef
from higgs_ds.errors import UserError
from higgs_ds.shard_writer import INDEX_NAME, SCHEMA_VERSION

MEMBER_TYPES = ("json", "codes.npy")


class ShardError(UserError):
    """A shard or index that cannot be read; the message names the file."""


def load_index(shard_dir: str | Path, check_files: bool = True) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path} not found: is {shard_dir} a directory written by `higgs-ds shards build`?")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path} is not valid JSON ({err})") from None
    if index.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path} has schema {index.get('schema_version')}, this reader reads {SCHEMA_VERSION}; "
            "rebuild the shards with this version of higgs-ds"
        )
    for shard in index["shards"] if check_files else []:
        if not (Path(shard_dir) / shard["file"]).is_file():
            raise ShardError(f"shard {Path(shard_dir) / shard['file']} is listed in {path} but missing")
    return index


def shard_refs(shard_dirs: list[str]) -> list[ShardRef]:
    refs = []
    for d in shard_dirs:
        for s in load_index(d)["shards"]:
            lengths = s.get("lengths")
            refs.append(ShardRef(str(Path(d) / s["file"]), s["num_samples"], tuple(lengths) if lengths else None))
    return refs


def _decode_member(shard: str, name: str, data: bytes):
    suffix = name.split(".", 1)[1] if "." in name else ""
    if suffix == "json":
        return json.loads(data.decode("utf-8"))
    if suffix == "codes.npy":
        codes = np.load(io.BytesIO(data), allow_pickle=False)
        if codes.dtype != np.uint16 or codes.ndim != 2:
            raise ShardError(f"{shard}: member {name} has dtype {codes.dtype} shape {codes.shape}, expected uint16 2-D")
        return codes
    raise ShardError(f"{shard}: unexpected member {name!r}; higgs-ds shards hold only {MEMBER_TYPES}")


def read_shard(path: str) -> Iterator[tuple[int, dict]]:
    """Yield (sample position in shard, {"json": ..., "codes": ...}) for every sample, in order: one
    sequential pass (verify, stats); training reads through member_table instead."""
    try:
        with tarfile.open(path, "r:") as tar:
            position, current_key, current = -1, None, {}
            for member in tar:
                if not member.isfile():
                    raise ShardError(f"{path}: member {member.name!r} is not a regular file")
                key, _, suffix = member.name.partition(".")
                if key != current_key:
                    if current_key is not None:
                        yield position, current
                    position, current_key, current = position + 1, key, {}
                value = _decode_member(path, member.name, tar.extractfile(member).read())
                current["codes" if suffix == "codes.npy" else suffix] = value
            if current_key is not None:
                yield position, current
    except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"cannot read shard {path}: {err}") from err


@functools.lru_cache(maxsize=64)
def member_table(path: str) -> tuple[tuple[tuple[str, str, int, int], ...], ...]:
    """Per sample, its members as (name, suffix, data offset, size): one pass over the tar headers,
    cached per process, so reading any sample later is one seek per member."""
    samples, current_key = [], None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise ShardError(f"{path}: member {member.name!r} is not a regular file")
                key, _, suffix = member.name.partition(".")
                if suffix not in MEMBER_TYPES:
                    raise ShardError(
                        f"{path}: unexpected member {member.name!r}; higgs-ds shards hold only {MEMBER_TYPES}"
                    )
                if key != current_key:
                    samples.append([])
                    current_key = key
                samples[-1].append((member.name, suffix, member.offset_data, member.size))
    except tarfile.TarError as err:
        raise ShardError(f"cannot read shard {path}: {err}") from err
    return tuple(tuple(members) for members in samples)


def read_positions(refs: list[ShardRef], positions: list[tuple[int, int]]) -> Iterator[dict]:
    """Read the samples at `positions`, in that order (random access through the member table)."""
    handles: dict[int, object] = {}
    try:
        for s, i in positions:
            table = member_table(refs[s].path)
            if i >= len(table):
                raise ShardError(
                    f"{refs[s].path}: sample {i} missing (the shard holds {len(table)}, its index says "
                    f"{refs[s].num_samples})"
                )
            f = handles.get(s) or handles.setdefault(s, open(refs[s].path, "rb"))
            record = {}
            for name, suffix, offset, size in table[i]:
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise ShardError(f"{refs[s].path}: member {name!r} is cut short")
                try:
                    record["codes" if suffix == "codes.npy" else suffix] = _decode_member(refs[s].path, name, data)
                except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
                    if isinstance(err, ShardError):
                        raise
                    raise ShardError(f"{refs[s].path}: member {name!r} cannot be decoded: {err}") from err
            yield record
    finally:
        for f in handles.values():
            f.close()
