"""Stage 5 of the data flow: shard directories -> this rank's and this worker's raw samples.

Which samples a rank and worker read is decided by higgs_ds.stream.plan; this module reads them, through the
strict parsers of higgs_ds.shards.format (the only code that interprets a shard's bytes):

- `load_index(dir)`: index.json parsed and schema-checked, and (check_files) every listed shard a regular
  file inside the directory with the size the index says: before training starts, on every rank.
- `member_table(path)`: at the first open of a shard in a process (a dataloader worker), its tar headers,
  its sample count and its sha256 are checked against the index (the sha256 once per machine and file
  version: shards.verified), and each member's offset kept, so reading a sample later is one seek and one read.
- `read_positions(refs, positions, vocab_size=)` (training) and `read_shard(path)` (verify, stats,
  evaluation): every sample decoded strictly and checked (`shard_format.check_sample`: fields and types,
  codes rows and values within the index's codec, token ids within the vocabulary) before it is returned,
  so nothing out of range reaches the model; any problem is a ShardError naming the shard and member.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

from higgs_ds.shards import verified
from higgs_ds.shards.format import (
    INDEX_FIX,
    MEMBER_TYPES,
    SampleLimits,
    ShardError,
    ShardSpec,
    check_sample,
    decode_codes,
    decode_json,
    decode_tokens,
    empty_shard_problem,
    group_samples,
    open_regular,
    parse_index,
    scan_tar,
    shard_file_problem,
)
from higgs_ds.shards.lengths import FAMILIES, V2
from higgs_ds.shards.sample_table import SampleTable, load_sample_table, sidecar_problem
from higgs_ds.shards.writer import INDEX_NAME
from higgs_ds.stream.plan import ShardRef

__all__ = [
    "MEMBER_TYPES",
    "ShardError",
    "lengths_tokenizer",
    "load_index",
    "member_table",
    "read_positions",
    "read_shard",
    "sample_table",
    "shard_refs",
]


def load_index(shard_dir: str | Path, check_files: bool = True) -> dict:
    """The validated index.json of `shard_dir`; with `check_files`, every shard it lists is checked on disk
    (a regular file inside the directory, of the listed size), so a wrong file fails before training."""
    path = Path(shard_dir) / INDEX_NAME
    if not path.exists():
        raise ShardError(f"{path} not found: is {shard_dir} a directory written by `higgs-ds shards build`?")
    if not path.is_file():
        raise ShardError(f"{path} is not a regular file; {INDEX_FIX}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ShardError(f"cannot read {path}: {err.strerror}") from None
    index = parse_index(raw, path)
    for entry in index["shards"] if check_files else []:
        problem = shard_file_problem(shard_dir, entry)
        if problem is None and entry["num_samples"] == 0:
            problem = empty_shard_problem(Path(shard_dir) / entry["file"])
        if problem:
            raise ShardError(f"shard {Path(shard_dir) / entry['file']} {problem}")
    problem = sidecar_problem(shard_dir, index) if check_files else None
    if problem:
        raise ShardError(problem)
    return index


def sample_table(shard_dir: str | Path, index: dict | None = None) -> SampleTable:
    """The per-sample rows of `shard_dir` (lengths, speaker ids, clone_parts): its index.samples.npy, hashed
    and checked once per process, or an old index's per-shard lists. `index`: its load_index, if at hand."""
    index = load_index(shard_dir, check_files=False) if index is None else index
    return load_sample_table(shard_dir, index, Path(shard_dir) / INDEX_NAME)


# directory -> (index.json's stat signature, {file name: (ShardSpec, SampleLimits)}): what each shard's
# index promises, looked up when a process first opens the shard (forked workers inherit it).
_PROMISES: dict[str, tuple[tuple, dict]] = {}


def _index_signature(directory: str) -> tuple | None:
    try:
        st = os.stat(os.path.join(directory, INDEX_NAME))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _remember(directory: str, signature: tuple, index: dict) -> dict:
    limits = SampleLimits(index["codec"]["num_codebooks"], index["codec"]["codebook_size"])
    promised = {e["file"]: (ShardSpec(e["num_samples"], e["bytes"], e["sha256"]), limits) for e in index["shards"]}
    _PROMISES[directory] = (signature, promised)
    return promised


def _promises(directory: str) -> dict:
    signature = _index_signature(directory)
    if signature is None:
        return {}  # a loose tar (tests, hand-made): only its structure is checked
    cached = _PROMISES.get(directory)
    if cached is not None and cached[0] == signature:
        return cached[1]
    return _remember(directory, signature, load_index(directory or ".", check_files=False))


def shard_promise(path: str) -> tuple[ShardSpec | None, SampleLimits]:
    """What the index beside shard `path` says about it (None, no limits: not listed in an index)."""
    directory, name = os.path.split(path)
    return _promises(directory).get(name, (None, SampleLimits()))


def codec_mismatches(index: dict, geometry, shard_dir: str) -> list[str]:
    """What in a shard set's codec provenance the model cannot read, each with how to fix it (every
    Higgs-Audio v2 model reads 25 Hz codes of 24 kHz audio; codebooks and their size from the model's
    higgs_ds.models.interface.geometry(config), whatever its family calls them)."""
    codec = index["codec"]
    want = {
        "num_codebooks": geometry.num_codebooks,
        "codebook_size": geometry.code_vocab,
        "frame_rate": 25,
        "sample_rate": 24000,
    }
    return [
        f"shards in {shard_dir} were built with a codec of {key}={codec.get(key)}, the model expects {value}: "
        "rebuild them with the model's codec (bosonai/higgs-audio-v2-tokenizer)"
        for key, value in want.items()
        if codec.get(key) != value
    ]


def shard_refs(shard_dirs: list[str], lengths_for: str = V2) -> list[ShardRef]:
    """Every shard of every directory, in order; `dataset` is the directory's place in `shard_dirs`.
    Per-sample fields are int32 numpy arrays (views of the directory's sample table; see
    shards.sample_table for the values): lengths (n,), speaker ids (n,) (-1: none; one id per speaker
    string within a directory), clone_parts (n, 2) ((-1, -1): not plain TTS, (-2, -2): no --tokenizer);
    each None where the index does not record it. `lengths_for` "v3": lengths and clone_parts in Higgs
    TTS 3 positions (shards.lengths): -1 lengths and (-1, -1) parts for samples v3 does not train, None
    lengths and (-2, -2) plain parts for a set built without a v3 tokenizer; lengths_tokenizer says which
    tokenizer computed them."""
    if lengths_for not in FAMILIES:
        raise ValueError(f"lengths_for={lengths_for!r}: expected one of {FAMILIES}")
    refs = []
    for d, shard_dir in enumerate(shard_dirs):
        signature = _index_signature(str(Path(shard_dir)))
        index = load_index(shard_dir)
        if signature is not None:  # the workers forked later find what each shard must be without re-reading
            _remember(str(Path(shard_dir)), signature, index)
        table = sample_table(shard_dir, index)
        for k, s in enumerate(index["shards"]):
            lengths, speakers, parts = table.shard_fields(k, lengths_for)
            refs.append(
                ShardRef(
                    str(Path(shard_dir) / s["file"]),
                    s["num_samples"],
                    lengths,
                    dataset=d,
                    speakers=speakers,
                    clone_parts=parts,
                )
            )
    return refs


def lengths_tokenizer(index: dict, family: str) -> str | None:
    """The fingerprint (stream.tokens.tokenizer_fingerprint) of the tokenizer that computed the index's
    `family` ("v2" or "v3") lengths; None when it has none (or slices merged from different tokenizers).
    A run plans with them only when it is its own tokenizer's: other positions than its batches have."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {FAMILIES}")
    build = index.get("build")
    key = "tokenizer_fingerprint" if family == V2 else "v3_tokenizer_fingerprint"
    value = build.get(key) if isinstance(build, dict) else None
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=64)
def member_table(path: str) -> tuple[tuple[tuple[str, str, int, int], ...], ...]:
    """Per sample, its members as (name, suffix, data offset, size): at the first open in this process every
    tar header is checked and, for a shard listed in an index, its size, sample count and sha256 (the
    sha256 once per machine and file version with shards.verified's mode "once", else at every open);
    cached per process, so reading any sample later is one seek and one read."""
    spec, _ = shard_promise(path)
    table = group_samples(path, scan_tar(path, spec, trust_record=verified.trust_records()))
    if spec is not None and len(table) != spec.num_samples:
        raise ShardError(
            f"{path} holds {len(table)} samples, its index.json says {spec.num_samples}: training would "
            f"read the wrong samples; {INDEX_FIX}"
        )
    return table


def decode_sample(path: str, members, span: bytes, first: int, limits: SampleLimits) -> dict:
    """One sample's members decoded from `span` (its bytes from offset `first`) and checked (check_sample)."""
    record, names = {}, {}
    for name, suffix, offset, size in members:
        data = span[offset - first : offset - first + size]
        if len(data) != size:
            raise ShardError(f"{path}: member {name!r} is cut short (the file changed after it was opened)")
        where = f"{path}: member {name!r}"
        if suffix == "json":
            record["json"], names["json"] = decode_json(data, where), name
        elif suffix == "codes.npy":
            record["codes"], names["codes"] = decode_codes(data, where), name
        else:
            record["tokens"], names["tokens"] = decode_tokens(data, where), name
    check_sample(record, path, names, limits)
    return record


def with_vocab(limits: SampleLimits, vocab_size: int | None) -> SampleLimits:
    """`limits` with the tokenizer's vocabulary size as the bound of stored token ids (None: unchanged)."""
    return limits if vocab_size is None else SampleLimits(limits.num_codebooks, limits.codebook_size, vocab_size)


def read_shard(path: str, vocab_size: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (sample position in shard, {"json": ..., "codes": ...}) for every sample, in order, each
    checked like training's (verify, stats, evaluation); size, sha256 and count are checked against the
    index first. Training reads through member_table / read_positions instead."""
    spec, limits = shard_promise(path)
    table = group_samples(path, scan_tar(path, spec))
    if spec is not None and len(table) != spec.num_samples:
        raise ShardError(f"{path} holds {len(table)} samples, its index.json says {spec.num_samples}; {INDEX_FIX}")
    limits = with_vocab(limits, vocab_size)
    with open_regular(path) as f:
        for position, members in enumerate(table):
            first = members[0][2]
            f.seek(first)
            span = f.read(members[-1][2] + members[-1][3] - first)
            yield position, decode_sample(path, members, span, first, limits)


def read_positions(
    refs: list[ShardRef], positions: list[tuple[int, int]], vocab_size: int | None = None
) -> Iterator[dict]:
    """Read the samples at `positions`, in that order (random access through the member table): one
    seek and one read per sample, since a sample's members are adjacent in the tar. `vocab_size` (the
    tokenizer's) bounds the token ids stored in the samples."""
    handles: dict[int, object] = {}
    limits: dict[int, SampleLimits] = {}
    try:
        for s, i in positions:
            path = refs[s].path
            table = member_table(path)
            if len(table) != refs[s].num_samples:
                raise ShardError(
                    f"{path} holds {len(table)} samples, its index says {refs[s].num_samples}; {INDEX_FIX}"
                )
            if s not in handles:
                limits[s] = with_vocab(shard_promise(path)[1], vocab_size)
                handles[s] = open_regular(path)
            f, members = handles[s], table[i]
            first = members[0][2]
            f.seek(first)
            span = f.read(members[-1][2] + members[-1][3] - first)
            yield decode_sample(path, members, span, first, limits[s])
    finally:
        for f in handles.values():
            f.close()
