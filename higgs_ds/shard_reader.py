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
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

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


def codec_mismatches(index: dict, model_config, shard_dir: str) -> list[str]:
    """What in a shard set's codec provenance the model cannot read, each with how to fix it (every
    Higgs-Audio v2 model reads 25 Hz codes of 24 kHz audio; codebooks and their size from its config)."""
    codec = index["codec"]
    want = {
        "num_codebooks": model_config.audio_num_codebooks,
        "codebook_size": model_config.audio_codebook_size,
        "frame_rate": 25,
        "sample_rate": 24000,
    }
    return [
        f"shards in {shard_dir} were built with a codec of {key}={codec.get(key)}, the model expects {value}: "
        "rebuild them with the model's codec (bosonai/higgs-audio-v2-tokenizer)"
        for key, value in want.items()
        if codec.get(key) != value
    ]


def shard_refs(shard_dirs: list[str]) -> list[ShardRef]:
    """Every shard of every directory, in order; `dataset` is the directory's place in `shard_dirs`."""
    refs = []
    for d, shard_dir in enumerate(shard_dirs):
        for s in load_index(shard_dir)["shards"]:
            lengths, speakers, parts = s.get("lengths"), s.get("speakers"), s.get("clone_parts")
            refs.append(
                ShardRef(
                    str(Path(shard_dir) / s["file"]),
                    s["num_samples"],
                    tuple(lengths) if lengths else None,
                    dataset=d,
                    speakers=tuple(speakers) if speakers is not None else None,
                    clone_parts=tuple(tuple(p) if p else None for p in parts) if parts is not None else None,
                )
            )
    return refs


# The header np.save writes for a C-order 2-D uint16 array; matched first because np.load parses the
# header with ast.literal_eval, which cost more than the rest of a sample's decoding.
_NPY_U16_2D = re.compile(
    rb"\x93NUMPY\x01\x00..\{'descr': '<u2', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n", re.S
)


def _decode_codes(data: bytes) -> np.ndarray:
    if not data.startswith(b"\x93NUMPY"):  # np.load would also open .npz archives
        raise ValueError("not a .npy array")
    m = _NPY_U16_2D.match(data)
    if m is None or m.end() != 10 + int.from_bytes(data[8:10], "little"):
        return np.load(io.BytesIO(data), allow_pickle=False)  # any other header: numpy's own reader, never pickle
    rows, cols = int(m.group(1)), int(m.group(2))
    if len(data) != m.end() + 2 * rows * cols:
        raise ValueError(f"npy data holds {len(data) - m.end()} bytes, its header says {2 * rows * cols}")
    return np.frombuffer(data, "<u2", rows * cols, m.end()).reshape(rows, cols)


def _decode_member(shard: str, name: str, data: bytes):
    suffix = name.split(".", 1)[1] if "." in name else ""
    if suffix == "json":
        return orjson.loads(data)  # strict UTF-8 JSON; several times faster than json on token id lists
    if suffix == "codes.npy":
        codes = _decode_codes(data)
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


def _scan_ustar(path: str) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of every member by reading only the 512-byte headers, or None when the
    archive holds anything but plain ustar regular files (pax/GNU headers, links, a header that does not
    parse or points past the end): tarfile reads those and names the damage. A quarter of tarfile's cost
    per member, which was most of a worker's time per shard. Header checksums are left to tarfile's path;
    shard contents are checked against the index's sha256 by `shards verify` and `preflight --hashes`."""
    members, pos = [], 0
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while True:
            f.seek(pos)
            block = f.read(512)
            if len(block) < 512:
                return None
            if block[0] == 0 and block.count(0) == 512:
                return members  # end-of-archive marker
            if block[156:157] not in (b"0", b"\0") or block[257:262] != b"ustar" or block[124] & 0x80:
                return None
            try:
                size = int(block[124:136].strip(b" \0"), 8)
                name, prefix = block[:100].split(b"\0", 1)[0], block[345:500].split(b"\0", 1)[0]
                name = (prefix + b"/" + name if prefix else name).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return None
            if pos + 512 + size > end:
                return None
            members.append((name, pos + 512, size))
            pos += 512 + -(-size // 512) * 512


def _scan_tarfile(path: str) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(path, "r:") as tar:
            members = []
            for member in tar:
                if not member.isfile():
                    raise ShardError(f"{path}: member {member.name!r} is not a regular file")
                members.append((member.name, member.offset_data, member.size))
            return members
    except tarfile.TarError as err:
        raise ShardError(f"cannot read shard {path}: {err}") from err


@functools.lru_cache(maxsize=64)
def member_table(path: str) -> tuple[tuple[tuple[str, str, int, int], ...], ...]:
    """Per sample, its members as (name, suffix, data offset, size): one pass over the tar headers,
    cached per process, so reading any sample later is one seek and one read."""
    scanned = _scan_ustar(path)
    samples, current_key = [], None
    for name, offset, size in scanned if scanned is not None else _scan_tarfile(path):
        key, _, suffix = name.partition(".")
        if suffix not in MEMBER_TYPES:
            raise ShardError(f"{path}: unexpected member {name!r}; higgs-ds shards hold only {MEMBER_TYPES}")
        if key != current_key:
            samples.append([])
            current_key = key
        samples[-1].append((name, suffix, offset, size))
    for members in samples:
        if sorted(m[1] for m in members) != sorted(MEMBER_TYPES):
            raise ShardError(
                f"{path}: sample {members[0][0].partition('.')[0]!r} has members {[m[0] for m in members]}, "
                f"a higgs-ds sample has exactly {MEMBER_TYPES} (a truncated or hand-made shard? rebuild it)"
            )
    return tuple(tuple(members) for members in samples)


def read_positions(refs: list[ShardRef], positions: list[tuple[int, int]]) -> Iterator[dict]:
    """Read the samples at `positions`, in that order (random access through the member table): one
    seek and one read per sample, since a sample's members are adjacent in the tar."""
    handles: dict[int, object] = {}
    try:
        for s, i in positions:
            path = refs[s].path
            table = member_table(path)
            if i >= len(table):
                raise ShardError(
                    f"{path}: sample {i} missing (the shard holds {len(table)}, its index says {refs[s].num_samples})"
                )
            f = handles.get(s) or handles.setdefault(s, open(path, "rb"))
            members = table[i]
            first = members[0][2]
            f.seek(first)
            span = f.read(members[-1][2] + members[-1][3] - first)
            record = {}
            for name, suffix, offset, size in members:
                data = span[offset - first : offset - first + size]
                if len(data) != size:
                    raise ShardError(f"{path}: member {name!r} is cut short")
                try:
                    record["codes" if suffix == "codes.npy" else suffix] = _decode_member(path, name, data)
                except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
                    if isinstance(err, ShardError):
                        raise
                    raise ShardError(f"{path}: member {name!r} cannot be decoded: {err}") from err
            yield record
    finally:
        for f in handles.values():
            f.close()
