"""Hostile and lying shard directories (issue #10, findings 3-5): every one is refused by name (the shard, its
member or the index key, and what to do), nothing hangs, nothing allocates what a header declares.

The shards are built here, byte by byte: a tar header writer of our own (so sizes, types and checksums can
lie), .npy headers by hand, index.json entries with the true size and sha256 of each hostile file (so the
content, not the hash, is what must be caught). Parsers that could hang or allocate on the old code run in
a subprocess with a timeout and an address-space limit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from higgs_ds.shards.writer import encode_codes
from higgs_ds.stream.reader import ShardError, load_index, member_table, read_positions, read_shard, shard_refs

REPO = Path(__file__).resolve().parents[1]
CODEC = {"codec": "test", "num_codebooks": 8, "codebook_size": 1024, "sample_rate": 24000, "hop_length": 960}
CODEC["frame_rate"] = 25
TIB16 = 1 << 44


# ---------------------------------------------------------------- building shards by hand


def header(name: str, size: int, *, typeflag=b"0", size_field: bytes | None = None, magic=b"ustar\x0000") -> bytes:
    """A ustar header as tarfile writes it, with any field replaceable by a lie; the checksum is computed."""
    h = bytearray(512)
    h[0 : len(name)] = name.encode()
    h[100:108], h[108:116], h[116:124] = b"0000444\0", b"0000000\0", b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = magic
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def member(name: str, data: bytes, **lies) -> bytes:
    return header(name, len(data), **lies) + data + bytes(-len(data) % 512)


def tar_of(*members: bytes) -> bytes:
    return b"".join(members) + bytes(1024)


def meta_of(key: str, frames: int, **changes) -> dict:
    meta = {
        "messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": "The birch canoe slid on the smooth planks."},
            {"role": "assistant", "content": {"type": "audio", "audio_url": "audio/a.wav"}},
        ],
        "speaker": "alice",
        "id": key,
        "source": {"manifest": "m.jsonl", "line": 1},
        "audio": [{"url": "audio/a.wav", "frames": frames, "seconds": frames / 25}],
        "target_frames": frames,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def codes_of(frames: int, rows: int = 8, top: int = 1023) -> np.ndarray:
    """Codes whose largest value is `top` (the last one)."""
    codes = (np.arange(rows * frames, dtype=np.uint16) % 1000).reshape(rows, frames)
    codes[-1, -1] = top
    return codes


def sample(key: str, meta=None, codes: bytes | None = None, frames: int = 5) -> bytes:
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta or meta_of(key, frames)).encode()
    codes = codes if codes is not None else encode_codes(codes_of(frames))
    return member(f"{key}.codes.npy", codes) + member(f"{key}.json", meta_bytes)


def good_tar(keys=("000000000", "000000001")) -> bytes:
    return tar_of(*(sample(k) for k in keys))


def write_set(directory: Path, shards: dict[str, tuple[bytes, int]], **index_changes) -> Path:
    """A shard directory: each file with its true size and sha256 in index.json; `num_samples` as given."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, (data, count) in shards.items():
        (directory / name).write_bytes(data)
        entries.append(
            {"file": name, "num_samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    index = {
        "schema_version": 1,
        "codec": CODEC,
        "num_samples": sum(e["num_samples"] for e in entries),
        "shards": entries,
        "build": {},
    }
    index.update(index_changes)
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def edit_index(directory: Path, change) -> None:
    index = json.loads((directory / "index.json").read_text())
    change(index)
    (directory / "index.json").write_text(json.dumps(index))


def bounded(args: list[str], timeout: float = 60, memory: int = 2 << 30) -> subprocess.CompletedProcess:
    """Run a command with a timeout and at most `memory` bytes of address space: a hang or a memory bomb
    in the code under test fails the test instead of the machine."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env, cwd=REPO)


# Reads every sample of one shard the way training does, in a bounded subprocess.
PROBE = """
import sys
from higgs_ds.stream.plan import ShardRef
from higgs_ds.errors import UserError
from higgs_ds.stream.reader import read_positions
path, n = sys.argv[1], int(sys.argv[2])
try:
    records = list(read_positions([ShardRef(path, n)], [(0, i) for i in range(n)]))
except UserError as err:
    print("REFUSED", err)
else:
    print("READ", len(records))
"""


def probe(path: Path, num_samples: int = 1) -> str:
    done = bounded([sys.executable, "-c", PROBE, str(path), str(num_samples)], timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]  # no traceback, no MemoryError, no kill
    return done.stdout.strip()


def test_hand_built_shards_are_what_the_standard_library_reads(tmp_path):
    """The helpers above build real tars and a set the reader accepts: the hostile cases differ only in the
    lie each tells."""
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (good_tar(), 2)})
    with tarfile.open(directory / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.codes.npy", "000000000.json", "000000001.codes.npy", "000000001.json"]
    refs = shard_refs([str(directory)])
    records = list(read_positions(refs, [(0, 1), (0, 0)], vocab_size=10))
    assert [r["json"]["id"] for r in records] == ["000000001", "000000000"]
    assert records[0]["codes"].shape == (8, 5) and records[0]["codes"].dtype == np.uint16


# ---------------------------------------------------------------- finding 3: tar headers


def _pax_negative_size() -> bytes:
    record = b"size=-1\n"
    record = b"%d %s" % (len(record) + 3, record)  # "11 size=-1\n": hangs CPython 3.11.7's tarfile
    return member("././@PaxHeader", record, typeflag=b"x") + sample("000000000")


TAR_LIES = {
    "negative octal size": (
        lambda: member("000000000.json", bytes(512), size_field=b"-0000001000\0") + sample("000000001"),
        "is not an octal number",
    ),
    "pax header with a negative size": (_pax_negative_size, "is a pax extended header"),
    "huge base-256 size": (
        lambda: member("000000000.json", b"{}", size_field=b"\x80" + (1 << 80).to_bytes(11, "big")),
        "base-256",
    ),
    "small base-256 size": (
        lambda: member("000000000.json", b"{}", size_field=b"\x80" + (2).to_bytes(11, "big")),
        "base-256",
    ),
    "size past the end of the file": (
        lambda: header("000000000.json", 1 << 32) + b"{}" + bytes(510),
        "past the end of the file",
    ),
    "GNU long name": (lambda: member("././@LongLink", b"x" * 200 + b"\0", typeflag=b"L"), "GNU long-name header"),
    "symbolic link member": (lambda: member("000000000.json", b"", typeflag=b"2"), "symbolic link"),
    "not ustar": (lambda: member("000000000.json", b"{}", magic=bytes(8)), "not a POSIX ustar header"),
    "garbage": (lambda: b"not a tar archive at all " * 100, "not a POSIX ustar header"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lie", sorted(TAR_LIES))
def test_lying_tar_headers_are_refused_by_name_without_hanging(tmp_path, lie):
    build, reason = TAR_LIES[lie]
    path = tmp_path / "evil.tar"
    path.write_bytes(tar_of(build()))
    out = probe(path)
    assert out.startswith("REFUSED") and str(path) in out and reason in out and "higgs-ds shards build" in out, out


@pytest.mark.timeout(60)
def test_a_header_checksum_is_checked(tmp_path):
    data = bytearray(good_tar())
    data[512 * 0 + 100] = ord("7")  # mode field of the first header; its checksum no longer matches
    path = tmp_path / "flipped.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"flipped.tar: tar header at byte 0: checksum .* does not match"):
        member_table(str(path))


@pytest.mark.timeout(60)
def test_tarfile_is_never_handed_a_shard(tmp_path, monkeypatch):
    """Anything unusual used to fall back to Python's tarfile (which hangs on a pax header with a negative
    size); the reader now never calls it, whatever the shard holds."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("tarfile.open was called on a shard")

    monkeypatch.setattr(tarfile, "open", refuse)
    for name, (build, _) in TAR_LIES.items():
        if "negative" in name:
            continue  # these would hang the old code in-process: covered by the bounded test above
        path = tmp_path / f"{len(name)}.tar"
        path.write_bytes(tar_of(build()))
        with pytest.raises(ShardError, match=str(path)):
            list(read_shard(str(path)))


# ---------------------------------------------------------------- finding 4: .npy and .json members


def npy(header_dict: str, payload: bytes = b"", version: int = 1) -> bytes:
    text = header_dict.encode()
    pad = -(len(text) + 11) % 64
    text += b" " * pad + b"\n"
    length = len(text).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + length + text + payload


NPY_LIES = {
    "16 TiB 1-D": (npy("{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % (TIB16 // 2)), "C-order 2-D"),
    "16 TiB 2-D": (npy("{'descr': '<u2', 'fortran_order': False, 'shape': (8, %d), }" % (TIB16 // 16)), "declares"),
    "16 TiB Fortran": (npy("{'descr': '<u2', 'fortran_order': True, 'shape': (8, %d), }" % (1 << 40)), "C-order"),
    "16 TiB as uint32": (npy("{'descr': '<u4', 'fortran_order': False, 'shape': (8, %d), }" % (1 << 39)), "'<u2'"),
    "version 2 header, huge": (
        npy("{'descr': '<u2', 'fortran_order': False, 'shape': (8, %d), }" % (1 << 40), version=2),
        "declares",
    ),
    "no rows, 2**63 frames": (npy("{'descr': '<u2', 'fortran_order': False, 'shape': (0, %d), }" % (1 << 63)), "1-256"),
    "object array": (npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"\x80\x04K\x01."), "pickle"),
    "npz archive": (b"PK\x03\x04" + bytes(100), "not a .npy array"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lie", sorted(NPY_LIES))
def test_npy_bombs_fail_fast_naming_shard_and_member(tmp_path, lie):
    data, reason = NPY_LIES[lie]
    path = tmp_path / "bomb.tar"
    path.write_bytes(tar_of(sample("000000000", codes=data)))
    out = probe(path)  # 2 GiB of address space: allocating what the header declares would fail the probe
    assert out.startswith("REFUSED") and f"{path}: member '000000000.codes.npy'" in out and reason in out, out
    assert "higgs-ds shards build" in out


def _ids(n_ids: int, top: int) -> dict:
    ids = [top - 1 if i == n_ids // 2 else i for i in range(n_ids)]
    return {"input_ids": ids, "label_ids": [-100] * n_ids}


# (JSON member bytes or meta, codes array, what the message must say); index codec: 8 codebooks of 1024
SAMPLE_LIES = {
    "list-valued JSON": (b"[1, 2, 3]", codes_of(5), "is a JSON list, a higgs-ds sample is an object"),
    "string-valued JSON": (b'"hello"', codes_of(5), "is a JSON str"),
    "invalid UTF-8": (b'{"id": "\xff"}', codes_of(5), "not valid UTF-8 JSON"),
    "NaN in JSON": (b'{"id": NaN}', codes_of(5), "not valid UTF-8 JSON"),
    "no audio": (meta_of("000000000", 5, audio=None), codes_of(5), "'audio'"),
    "no messages": (meta_of("000000000", 5, messages=None), codes_of(5), "'messages' is missing"),
    "messages not a list": (meta_of("000000000", 5, messages={"a": 1}), codes_of(5), "'messages' must be a list"),
    "frames a string": (
        meta_of("000000000", 5, audio=[{"url": "a", "frames": "5", "seconds": 0.2}]),
        codes_of(5),
        "integer 'frames'",
    ),
    "more audio items than messages": (
        meta_of("000000000", 5, audio=[{"url": "a", "frames": 5, "seconds": 0.2}] * 2),
        codes_of(5),
        "'audio' lists 2 items, the messages hold 1",
    ),
    "id a number": (meta_of("000000000", 5, id=7), codes_of(5), "'id'"),
    "frames disagree with codes": (meta_of("000000000", 6), codes_of(5), "codes hold 5 frames, its audio items 6"),
    "code >= codebook size": (meta_of("000000000", 5), codes_of(5, top=1024), "code 1024 >= the codebook size 1024"),
    "code far out of range": (meta_of("000000000", 5), codes_of(5, top=65535), "code 65535 >= the codebook size"),
    "wrong number of codebooks": (meta_of("000000000", 5), codes_of(5, rows=7), "7 rows, the codec has 8"),
    "ids without labels": (meta_of("000000000", 5, input_ids=[1, 2]), codes_of(5), "'input_ids' and 'label_ids'"),
    "ids not integers": (
        meta_of("000000000", 5, input_ids=[1.5, 2], label_ids=[-100, 2]),
        codes_of(5),
        "must hold integers",
    ),
    "negative token id": (
        meta_of("000000000", 5, input_ids=[-3, 2], label_ids=[-100, 2]),
        codes_of(5),
        "token id -3 is outside",
    ),
    "token id outside the vocabulary": (
        meta_of("000000000", 5, **_ids(20, 50_000)),
        codes_of(5),
        "token id 49999 is outside the tokenizer's vocabulary [0, 1000)",
    ),
    "labels a list of lists": (
        meta_of("000000000", 5, input_ids=[1, 2], label_ids=[[1, 2], [3, 4]]),
        codes_of(5),
        "must hold integers",
    ),
    "label outside the vocabulary": (
        meta_of("000000000", 5, input_ids=[1, 2], label_ids=[1, 5000]),
        codes_of(5),
        "label ids must be -100 or token ids in [0, 1000)",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lie", sorted(SAMPLE_LIES))
def test_untrainable_samples_fail_in_the_reader_naming_shard_and_member(tmp_path, lie):
    meta, codes, reason = SAMPLE_LIES[lie]
    _refused_by_both_readers(tmp_path, tar_of(sample("000000000", meta, encode_codes(codes))), reason, "")


def _refused_by_both_readers(tmp_path, shard: bytes, reason: str, suffix: str) -> Path:
    """The one-sample shard is refused by training's reader and by read_shard (verify, stats and evaluation
    read the same way), naming shard and member (`suffix`: the member's, or "" for any) and the fix."""
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (shard, 1)})
    path = directory / "shard-000000.tar"
    with pytest.raises(ShardError) as err:
        list(read_positions(shard_refs([str(directory)]), [(0, 0)], vocab_size=1000))
    message = str(err.value)
    assert message.startswith(f"{path}: member '000000000.{suffix}") and reason in message, message
    assert "higgs-ds shards build" in message
    with pytest.raises(ShardError, match=re.escape(reason)):
        list(read_shard(str(path), vocab_size=1000))
    return path


# ---------------------------------------------------------------- the KEY.tokens.npy member (token ids)


def saved(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kwargs)
    return buf.getvalue()


def with_tokens(key: str, tokens: bytes, *extra: bytes, meta=None) -> bytes:
    return sample(key, meta) + member(f"{key}.tokens.npy", tokens) + b"".join(extra)


GOOD_TOKENS = np.array([[1, 2, 3, 4], [-100, -100, 3, 4]], "<i4")
TOKENS_HEAD = "{'descr': '<i4', 'fortran_order': False, 'shape': (2, %d), }"
# (the sample's members, what the message must say, the member it must name)
TOKEN_LIES = {
    "int64 ids": (with_tokens("000000000", saved(GOOD_TOKENS.astype(np.int64))), "'<i4' (int32)", "tokens.npy"),
    "float ids": (with_tokens("000000000", saved(GOOD_TOKENS.astype(np.float32))), "'<i4' (int32)", "tokens.npy"),
    "big-endian ids": (with_tokens("000000000", saved(GOOD_TOKENS.astype(">i4"))), "'<i4' (int32)", "tokens.npy"),
    "one row": (with_tokens("000000000", saved(GOOD_TOKENS[:1])), "(2, n)", "tokens.npy"),
    "fortran order": (with_tokens("000000000", saved(np.asfortranarray(GOOD_TOKENS))), "C-order", "tokens.npy"),
    "pickled object array": (
        with_tokens("000000000", saved(np.array([[1, "x"], [2, None]], dtype=object), allow_pickle=True)),
        "never an object array or pickle",
        "tokens.npy",
    ),
    "cut short": (with_tokens("000000000", saved(GOOD_TOKENS)[:-4]), "32 bytes, the member holds 28", "tokens.npy"),
    "declares 2**40 tokens": (
        with_tokens("000000000", npy(TOKENS_HEAD % (1 << 40), GOOD_TOKENS.tobytes())),
        "declares shape (2, 1099511627776)",
        "tokens.npy",
    ),
    "no tokens": (with_tokens("000000000", npy(TOKENS_HEAD % 0)), "declares shape (2, 0)", "tokens.npy"),
    "id outside the vocabulary": (
        with_tokens("000000000", saved(np.array([[1, 5000], [-100, 2]], "<i4"))),
        "token id 5000 is outside the tokenizer's vocabulary [0, 1000)",
        "tokens.npy",
    ),
    "negative id": (
        with_tokens("000000000", saved(np.array([[-1, 2], [-100, 2]], "<i4"))),
        "token id -1",
        "tokens.npy",
    ),
    "label outside the vocabulary": (
        with_tokens("000000000", saved(np.array([[1, 2], [-5, 2]], "<i4"))),
        "label ids must be -100 or token ids in [0, 1000)",
        "tokens.npy",
    ),
    "ids in the JSON too": (
        with_tokens("000000000", saved(GOOD_TOKENS), meta=meta_of("000000000", 5, input_ids=[1], label_ids=[1])),
        "the sample's JSON holds token ids too",
        "tokens.npy",
    ),
}
# members that do not make a sample: refused by the member table, naming the sample's members
TOKEN_MEMBER_LIES = {
    "duplicated": with_tokens("000000000", saved(GOOD_TOKENS), member("000000000.tokens.npy", saved(GOOD_TOKENS))),
    "without codes": member("000000000.json", json.dumps(meta_of("000000000", 5)).encode())
    + member("000000000.tokens.npy", saved(GOOD_TOKENS)),
    "without JSON": member("000000000.codes.npy", encode_codes(codes_of(5)))
    + member("000000000.tokens.npy", saved(GOOD_TOKENS)),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lie", sorted(TOKEN_LIES))
def test_lying_token_members_fail_naming_shard_and_member(tmp_path, lie):
    members, reason, suffix = TOKEN_LIES[lie]
    path = _refused_by_both_readers(tmp_path, tar_of(members), reason, f"{suffix}'")
    if lie == "declares 2**40 tokens":  # 8 TiB declared: refused before anything is allocated
        assert probe(path).startswith("REFUSED")


@pytest.mark.parametrize("lie", sorted(TOKEN_MEMBER_LIES))
def test_samples_with_a_wrong_set_of_token_members_are_refused(tmp_path, lie):
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (tar_of(TOKEN_MEMBER_LIES[lie]), 1)})
    with pytest.raises(ShardError, match=r"sample '000000000' has members .*at most one KEY.tokens.npy"):
        list(read_positions(shard_refs([str(directory)]), [(0, 0)], vocab_size=1000))


def test_good_token_members_read_as_their_ids(tmp_path):
    directory = write_set(
        tmp_path / "set", {"shard-000000.tar": (tar_of(with_tokens("000000000", saved(GOOD_TOKENS))), 1)}
    )
    (record,) = read_positions(shard_refs([str(directory)]), [(0, 0)], vocab_size=1000)
    ids, labels = record["token_ids"]
    assert ids.tolist() == [1, 2, 3, 4] and labels.tolist() == [-100, -100, 3, 4]


# ---------------------------------------------------------------- finding 5: index.json


def _entry(index, key, value):
    index["shards"][0][key] = value


INDEX_LIES = {
    "absolute path": (lambda i: _entry(i, "file", "/dev/zero"), "shards[0].file '/dev/zero' is not a bare file name"),
    "parent path": (lambda i: _entry(i, "file", "../other/shard.tar"), "is not a bare file name"),
    "NUL in the name": (lambda i: _entry(i, "file", "shard\0.tar"), "is not a bare file name"),
    "not a tar": (lambda i: _entry(i, "file", "index.json"), "does not name a .tar shard"),
    "listed twice": (lambda i: i["shards"].append(dict(i["shards"][0])), "is listed twice"),
    "negative count": (lambda i: _entry(i, "num_samples", -1), "'num_samples' is -1"),
    "count a string": (lambda i: _entry(i, "num_samples", "2"), "'num_samples' is '2'"),
    "count a boolean": (lambda i: _entry(i, "num_samples", True), "'num_samples' is True"),
    "huge count": (
        lambda i: (_entry(i, "num_samples", 10**15), i.update(num_samples=10**15)),
        "declares 1000000000000000 samples in",
    ),
    "bytes negative": (lambda i: _entry(i, "bytes", -5), "'bytes' is -5"),
    "sha256 not hex": (lambda i: _entry(i, "sha256", "z" * 64), "'sha256'"),
    "total disagrees": (lambda i: i.update(num_samples=3), "num_samples is 3, its shards hold 2"),
    "lengths too short": (lambda i: _entry(i, "lengths", [10]), "lists 1 lengths for 2 samples"),
    "speakers of the wrong type": (lambda i: _entry(i, "speakers", [1, 2]), "'speakers' holds a value"),
    "codebook size zero": (lambda i: i["codec"].update(codebook_size=0), "codec.codebook_size is 0"),
    "codebooks missing": (lambda i: i["codec"].pop("num_codebooks"), "codec.num_codebooks is None"),
    "shards not a list": (lambda i: i.update(shards={"file": "x.tar"}), "'shards' is missing or not a list"),
    "codec a list": (lambda i: i.update(codec=[8, 1024]), "'codec' (the codec provenance) is missing or not an"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lie", sorted(INDEX_LIES))
def test_lying_index_is_one_named_error(tmp_path, lie):
    change, reason = INDEX_LIES[lie]
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (good_tar(), 2)})
    edit_index(directory, change)
    for check_files in (True, False):  # training and preflight / verify alike
        with pytest.raises(ShardError) as err:
            load_index(directory, check_files=check_files)
        message = str(err.value)
        assert message.startswith(str(directory / "index.json")) and reason in message, message
        assert "rebuild the shard set with `higgs-ds shards build`" in message


@pytest.mark.timeout(60)
def test_index_json_itself_must_be_a_json_object_file(tmp_path):
    directory = tmp_path / "set"
    directory.mkdir()
    (directory / "index.json").write_text("[1, 2]")
    with pytest.raises(ShardError, match=r"index.json: is a JSON list, not an object"):
        load_index(directory)
    (directory / "index.json").unlink()
    (directory / "index.json").symlink_to("/dev/zero")
    with pytest.raises(ShardError, match=r"index.json is not a regular file"):
        load_index(directory)


@pytest.mark.timeout(60)
def test_shard_files_must_be_regular_files_inside_the_directory(tmp_path):
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes(good_tar())
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (good_tar(), 2), "shard-000001.tar": (b"", 0)})
    (directory / "shard-000001.tar").unlink()
    for make, reason in (
        (lambda p: p.symlink_to("/dev/zero"), "is a symbolic link to /dev/zero, outside"),
        (lambda p: p.symlink_to(outside), f"is a symbolic link to {os.path.realpath(outside)}, outside"),
        (os.mkfifo, "is a fifo, not a regular file"),
        (os.mkdir, "is a directory, not a regular file"),
    ):
        target = directory / "shard-000001.tar"
        make(target)
        with pytest.raises(ShardError) as err:
            load_index(directory)
        assert str(err.value).startswith(f"shard {target} {reason}"), str(err.value)
        target.rmdir() if target.is_dir() and not target.is_symlink() else target.unlink()
    (directory / "shard-000001.tar").symlink_to("shard-000000.tar")  # a link inside the directory is fine
    edit_index(directory, lambda i: i["shards"][1].update(i["shards"][0], file="shard-000001.tar"))
    edit_index(directory, lambda i: i.update(num_samples=4))
    assert len(shard_refs([str(directory)])) == 2


@pytest.mark.timeout(60)
def test_size_is_checked_before_training_and_sha256_and_count_at_first_open(tmp_path):
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (good_tar(), 2)})
    path = directory / "shard-000000.tar"
    size = len(good_tar())
    path.write_bytes(good_tar() + bytes(512))  # one block longer than the index says
    expected = rf"shard {path} has {size + 512} bytes, its index.json says {size}: .*restore"
    with pytest.raises(ShardError, match=expected):
        shard_refs([str(directory)])

    data = bytearray(good_tar())
    data[512 * 1 + 200] ^= 0xFF  # a code inside the first sample's .npy data: same size, other bytes
    path.write_bytes(bytes(data))
    refs = shard_refs([str(directory)])  # the size agrees: training starts
    with pytest.raises(ShardError, match=rf"{path}: its sha256 differs from its index.json.*restore it"):
        list(read_positions(refs, [(0, 1)]))  # a sample the damage is not in: the first open hashes the file


@pytest.mark.timeout(60)
def test_an_index_that_lies_about_the_count_is_refused_not_trained_on_a_subset(tmp_path):
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (good_tar(), 1)})  # it holds 2
    refs = shard_refs([str(directory)])
    with pytest.raises(ShardError, match=r"shard-000000.tar holds 2 samples, its index.json says 1"):
        list(read_positions(refs, [(0, 0)]))
    edit_index(directory, lambda i: (i["shards"][0].update(num_samples=0), i.update(num_samples=0)))
    with pytest.raises(ShardError, match=r"shard-000000.tar holds tar members, its index.json says 0 samples"):
        shard_refs([str(directory)])  # a shard of 0 samples is never opened by training: checked up front


# ---------------------------------------------------------------- `higgs-ds shards verify`


def _verify(directory: Path) -> subprocess.CompletedProcess:
    return bounded([sys.executable, "-m", "higgs_ds.cli", "shards", "verify", str(directory)], timeout=120)


@pytest.mark.timeout(180)
def test_verify_reports_every_bad_shard_and_checks_the_others(tmp_path):
    """One good shard among shards that each once aborted, hung or allocated in verify: every bad one is
    reported with its reason, the good one is checked, exit 1, no traceback."""
    bad = {  # members of one sample, and what the report must say
        "list-valued JSON": (sample("000000000", b"[1, 2]"), "is a JSON list"),
        "no audio": (sample("000000000", meta_of("000000000", 5, audio=None)), "'audio'"),
        "base-256 size": (TAR_LIES["huge base-256 size"][0](), "base-256"),
        "negative size": (TAR_LIES["negative octal size"][0](), "is not an octal number"),
        "pax negative size": (_pax_negative_size(), "pax extended header"),
        "16 TiB npy": (sample("000000000", codes=NPY_LIES["16 TiB 1-D"][0]), "C-order 2-D"),
        "code out of range": (sample("000000000", codes=encode_codes(codes_of(5, top=4000))), "codebook size"),
    }
    shards = {"shard-000000.tar": (good_tar(), 2)}
    for k, (members, _) in enumerate(bad.values(), start=1):
        shards[f"shard-{k:06d}.tar"] = (tar_of(members), 1)
    directory = write_set(tmp_path / "set", shards)
    # a shard that is a link to /dev/zero, and a fifo: refused by name without being opened
    for name, make in (("shard-000100.tar", lambda p: p.symlink_to("/dev/zero")), ("shard-000101.tar", os.mkfifo)):
        make(directory / name)
        entry = {"file": name, "num_samples": 0, "bytes": 0, "sha256": "0" * 64}
        edit_index(directory, lambda i, entry=entry: i["shards"].append(entry))
    done = _verify(directory)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    result = json.loads(done.stdout)
    assert result["samples_checked"] == 2 and result["shards"] == len(shards) + 2
    reported = result["bad_shards"]
    assert str(directory / "shard-000000.tar") not in reported
    for k, (lie, (_, reason)) in enumerate(bad.items(), start=1):
        why = reported[str(directory / f"shard-{k:06d}.tar")]
        assert reason in why and "higgs-ds shards build" in why, (lie, why)
    assert "symbolic link to /dev/zero" in reported[str(directory / "shard-000100.tar")]
    assert "is a fifo" in reported[str(directory / "shard-000101.tar")]
    for path in reported:
        assert f"bad shard {path}: " in done.stderr


@pytest.mark.timeout(120)
def test_verify_of_a_lying_index_is_one_error_line_and_never_reads_dev_zero(tmp_path):
    directory = write_set(tmp_path / "set", {"shard-000000.tar": (good_tar(), 2)})
    edit_index(directory, lambda i: i["shards"].append({"file": "/dev/zero", "num_samples": 0, "bytes": 0}))
    done = _verify(directory)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"higgs-ds: error: {directory / 'index.json'}: shards[1].file")
    assert "'/dev/zero' is not a bare file name" in lines[0] and "higgs-ds shards build" in lines[0]
