"""The shard builder: manifests -> audio -> codec codes -> shards + index + rejects.

    higgs-ds shards build MANIFEST [MANIFEST ...] --out DIR --codec tiny|PATH [--workers N] [--slice I/N]

Audio is decoded, resampled to 24 kHz and encoded once here, so training never touches waveforms.

* Every non-blank input line ends up either in a shard or in rejects.jsonl with its reason; the build
  checks accepted + rejected = input lines. Sample keys are the line's ordinal in the whole input, so
  keys, order and content do not depend on the number of workers or slices.
* `--workers N` encodes in N processes (ordered results: the same shards whatever N is). Inside a
  worker, clips of exactly equal length are encoded as one batch (padding would change their codes).
* `--slice I/N` builds the I-th contiguous part of the input (for job arrays): its shards are named
  shard-IIII-NNNNNN.tar and it writes index.slice-I-of-N.json; `higgs-ds shards index DIR` merges them.
* `--tokenizer DIR`, up to twice (a Higgs-Audio v2 and a Higgs TTS 3 model or tokenizer directory): exact
  expanded lengths per sample in each family's positions, for budget batching (higgs_ds.shards.lengths).
* A journal line is written after each completed shard; `--resume` verifies the journalled shards and
  continues after the last one instead of starting again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from higgs_ds.errors import CheckFailed, UserError
from higgs_ds.safe_io import DirLock, atomic_write_text, fsync_dir, publish, temp_path
from higgs_ds.shards.audio import AudioError, load_audio
from higgs_ds.shards.codec import sha256_file
from higgs_ds.shards.lengths import (
    V2,
    V3,
    V3_KEY,
    Tokenizers,
    load_tokenizer,
    resolve_tokenizers,
    v3_encoder,
    v3_fields,
    v3_summary,
)
from higgs_ds.shards.manifest import (
    ManifestSample,
    Reject,
    audio_items,
    check_manifest_path,
    iter_manifests,
    manifest_lines,
)
from higgs_ds.shards.sample_table import sidecar_name
from higgs_ds.shards.split import TRAIN, Split, parse_split
from higgs_ds.shards.writer import INDEX_NAME, REJECTS_NAME, ShardWriter, write_index
from higgs_ds.stream.tokens import speaker_of


@dataclass(frozen=True)
class BuildConfig:
    max_seconds: float = 30.0
    """Longest audio item accepted, in seconds; longer items are rejected, never truncated."""
    max_sample_seconds: float = 120.0
    """Longest total audio per sample (references + targets), in seconds."""
    shard_samples: int = 1000
    """Samples per shard (a shard also closes at shard_bytes)."""
    shard_bytes: int = 256 << 20
    """Bytes per shard (approximate: a shard closes after the sample that reaches it)."""
    min_shards: int = 1
    """Make shards small enough that there are at least this many (ranks x dataloader workers)."""
    workers: int = 1
    """Encoding processes."""
    chunk: int = 32
    """Samples handed to a worker at a time (equal-length clips inside a chunk are batched)."""
    codec_batch: int = 0
    """Equal-length clips per codec call; 0: 16 on a GPU, 1 on a CPU, where batching does not pay."""
    fast_fail: bool = False
    """Stop at the first bad sample instead of recording it in rejects.jsonl."""
    slice_index: int = 0
    num_slices: int = 1
    resume: bool = False
    tokenizer: str | tuple[str, ...] | None = None
    """Model (or tokenizer) directories whose tokenizers give exact expanded lengths, stored per sample and
    in the index: at most one Higgs-Audio v2 and one Higgs TTS 3 (shards.lengths)."""
    split: str | None = None
    """Hold out part of the samples (higgs_ds.shards.split: '0.05' or 'speakers=a,b'); see split_part."""
    split_part: str = "train"
    """With split: the part this build writes, train or heldout (the other part is counted, not encoded)."""


class BuildError(UserError):
    pass


def slice_names(cfg: BuildConfig) -> tuple[str, str, str, str]:
    """(shard name pattern, index file, rejects file, journal file) of this slice."""
    if cfg.num_slices == 1:
        return "shard-{:06d}.tar", INDEX_NAME, REJECTS_NAME, ".build-journal.jsonl"
    tag = f"slice-{cfg.slice_index:04d}-of-{cfg.num_slices:04d}"
    return (
        f"shard-{cfg.slice_index:04d}-" + "{:06d}.tar",
        f"index.{tag}.json",
        f"rejects.{tag}.jsonl",
        f".build-journal.{tag}.jsonl",
    )


# ---------------------------------------------------------------- encoding (runs in worker processes)

_WORKER: dict = {}


def _init_worker(codec_spec: str, device: str, tokenizers: Tokenizers | None, threads: int, codec=None) -> None:
    import torch

    from higgs_ds.shards.codec import resolve_codec

    torch.set_num_threads(threads)
    _WORKER["codec"] = codec or resolve_codec(codec_spec, device=device)
    # a build without --tokenizer must not use an earlier build's in this process
    _WORKER.pop("tokenizer", None)
    _WORKER.pop("v3_encoder", None)
    if tokenizers is not None and tokenizers.v2:
        _WORKER["tokenizer"] = load_tokenizer(tokenizers.v2)
    if tokenizers is not None and tokenizers.v3:
        _WORKER["v3_encoder"] = v3_encoder(tokenizers.v3)


def _encode_clips(paths: list[str], cfg: BuildConfig) -> dict:
    """path -> (codes, seconds) or AudioError; equal-length clips are encoded in one batch."""
    codec = _WORKER["codec"]
    rate = codec.provenance["sample_rate"]
    # the codec's convolutions fail on less than one frame (40 ms), and such a clip says nothing anyway
    min_seconds = codec.provenance["hop_length"] / rate
    waves, results = {}, {}
    for path in paths:
        try:
            waves[path] = load_audio(path, rate, max_seconds=cfg.max_seconds, min_seconds=min_seconds)
        except AudioError as err:
            results[path] = err
        except MemoryError:
            results[path] = AudioError(f"audio is too large to decode in memory: {path}")
    by_length: dict[int, list[str]] = {}
    for path, wave in waves.items():
        by_length.setdefault(len(wave), []).append(path)
    # Batches pay on a GPU; on a CPU the codec's convolutions gain nothing and a batch of 8 ran at 0.3-2.2x
    # the speed of one clip at a time (bench/shard_build.py), so clips go one by one there (same codes).
    batch = cfg.codec_batch or (16 if str(codec.model.device).startswith("cuda") else 1)
    for length, group in by_length.items():
        for start in range(0, len(group), batch):
            part = group[start : start + batch]
            for path, c in zip(part, _encode_group(codec, [waves[p] for p in part], part)):
                results[path] = c if isinstance(c, AudioError) else (c, length / rate)
    return results


def _encode_group(codec, waves: list, paths: list[str]) -> list:
    """Codes per wave; if the batch fails, each clip alone, so one clip the codec refuses rejects only its
    samples. Running out of memory is the machine's problem, not the clip's: it stops the build."""
    import torch

    try:
        return list(codec.encode_batch(np.stack(waves)))
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - reported per clip below
        if len(waves) == 1:
            return [AudioError(f"the codec could not encode this audio ({type(err).__name__}: {err}): {paths[0]}")]
    return [_encode_group(codec, [w], [p])[0] for w, p in zip(waves, paths)]


def _tokens(chatml: dict, frames: list[int], sample_id) -> dict:
    """With a v2 --tokenizer: boson's token ids (the writer stores them as the KEY.tokens.npy member) and the
    exact expanded length (in the sample's json)."""
    tok = _WORKER.get("tokenizer")
    if tok is None:
        return {}
    from higgs_ds.stream.tokens import chatml_tokens, clone_parts, expanded_length, plain_tts

    input_ids, label_ids, _ = chatml_tokens(chatml, tok, sample_id)
    out = {"input_ids": input_ids, "label_ids": label_ids, "expanded_length": expanded_length(len(input_ids), frames)}
    if plain_tts(chatml):  # its turns' lengths: planning with cloning references knows a pair's length
        out["clone_parts"] = clone_parts(input_ids, frames, tok.convert_tokens_to_ids("<|start_header_id|>"))
    return out


def encode_chunk(items: list, cfg: BuildConfig) -> list:
    """Manifest items (ordinal, ManifestSample | Reject) -> (ordinal, (record, codes, seconds) | Reject)."""
    clips = _encode_clips(sorted({p for _, it in items if isinstance(it, ManifestSample) for p in it.audio_paths}), cfg)
    out = []
    for ordinal, item in items:
        if isinstance(item, ManifestSample):
            item = _assemble(item, clips, cfg)
        out.append((ordinal, item))
    return out


def _assemble(sample: ManifestSample, clips: dict, cfg: BuildConfig):
    codes, items, total, target_frames = [], [], 0.0, 0
    start = sample.chatml.get("start_index") or 0
    for (msg_index, item), path in zip(audio_items(sample.chatml["messages"]), sample.audio_paths, strict=True):
        clip = clips[path]
        if isinstance(clip, AudioError):
            return Reject(sample.manifest, sample.line, sample.sample_id, str(clip))
        c, seconds = clip
        codes.append(c)
        total += seconds
        items.append({"url": item["audio_url"], "frames": int(c.shape[1]), "seconds": round(seconds, 3)})
        if sample.chatml["messages"][msg_index]["role"] == "assistant" and msg_index >= start:
            target_frames += int(c.shape[1])
    if total > cfg.max_sample_seconds:
        return Reject(
            sample.manifest,
            sample.line,
            sample.sample_id,
            f"sample holds {total:.1f} s of audio, over --max-sample-seconds {cfg.max_sample_seconds:g}",
        )
    record = dict(
        sample.chatml,
        id=sample.sample_id,
        source={"manifest": sample.manifest, "line": sample.line},
        audio=items,
        target_frames=target_frames,
    )
    codes = np.concatenate(codes, axis=1)
    try:
        record.update(_tokens(sample.chatml, [i["frames"] for i in items], sample.sample_id))
        if "v3_encoder" in _WORKER:  # a sample v3 does not train is kept (v2 trains it): shards.lengths
            record[V3_KEY] = v3_fields({"json": record, "codes": codes}, _WORKER["v3_encoder"])
    except UserError as err:
        return Reject(sample.manifest, sample.line, sample.sample_id, str(err))
    except Exception as err:  # noqa: BLE001 - boson's text processing, on text we do not control
        reason = f"the tokenizer could not encode this sample ({type(err).__name__}: {err})"
        return Reject(sample.manifest, sample.line, sample.sample_id, reason)
    return record, codes, total


# ---------------------------------------------------------------- the driver


# quoted field names stay in a reject's summary key; other quoted text is the user's value
_FIELDS = {"messages", "role", "content", "type", "text", "audio", "audio_url", "start_index", "speaker", "misc", "id"}
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def reason_kind(reason: str) -> str:
    """The summary's key for a reject reason: its head without the message it is about, user values and
    numbers generalised ("unknown role '…'", "audio is N s, over --max-seconds N")."""
    head = re.sub(r"^messages\[\d+\][^:]*: ", "", reason).split(": ")[0].split(" (")[0]
    head = _QUOTED.sub(lambda m: m[0] if m[0][1:-1] in _FIELDS else "'…'", head)
    return re.sub(r"(?<![\w-])\d+(\.\d+)?", "N", head)


def count_inputs(manifests: list[str]) -> int:
    return sum(1 for m in manifests for _ in manifest_lines(m))


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


@dataclass(frozen=True)
class OtherPart:
    """A sample of the split's other part: counted by this build, encoded by the other one."""

    sample_id: str


def _chunks(manifests, start: int, end: int, size: int, split: Split | None = None, part: str = TRAIN):
    chunk = []
    for ordinal, item in iter_manifests(manifests):
        if ordinal >= end:
            break
        if ordinal < start:
            continue
        if split is not None and isinstance(item, ManifestSample):
            if split.part_of(item.sample_id, speaker_of(item.chatml)) != part:
                item = OtherPart(item.sample_id)
        chunk.append((ordinal, item))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- what a resume must match

JOURNAL_FORMAT = "higgs-ds shard build journal"
JOURNAL_VERSION = 2
_SHA256 = re.compile(r"[0-9a-f]{64}")


def build_fingerprint(
    manifests: list[str], codec_provenance: dict, cfg: BuildConfig, total: int, tokenizer, v3_tokenizer=None
) -> dict:
    """Everything that decides the bytes a build writes: the manifests' content (and where they are: audio
    paths are relative to them), the codec, the settings that change which samples go where, the tokenizers
    (the v3 one only when given: a build without it keeps its fingerprint).
    Left out, because the output does not depend on them: --workers and the chunking (results are ordered),
    --codec-batch (batched codes equal one-at-a-time codes, tests/test_codec.py), --fast-fail (it only says
    where a build stops), the device, and the codec's folder (its weights' sha256 is the codec's identity)."""
    return {
        "manifests": [{"path": str(Path(m).resolve()), "sha256": sha256_file(m)} for m in manifests],
        "codec": {k: v for k, v in sorted(codec_provenance.items()) if k != "codec_path"},
        "settings": {
            "inputs": total,
            "slice": [cfg.slice_index, cfg.num_slices],
            "max_seconds": cfg.max_seconds,
            "max_sample_seconds": cfg.max_sample_seconds,
            "shard_samples": cfg.shard_samples,
            "shard_bytes": cfg.shard_bytes,
            "min_shards": cfg.min_shards,
            **({"split": [parse_split(cfg.split).spec(), cfg.split_part]} if cfg.split else {}),
        },
        "tokenizer": tokenizer,
        **({"v3_tokenizer": v3_tokenizer} if v3_tokenizer else {}),
    }


def inputs_digest(fingerprint: dict) -> str:
    """One hash of a fingerprint without the slice number: the slices of one job array share it."""
    settings = {k: v for k, v in fingerprint["settings"].items() if k != "slice"}
    same = dict(fingerprint, settings=settings, slices=fingerprint["settings"]["slice"][1])
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}[{i}]").items()}
    return {prefix: obj}


def fingerprint_changes(before: dict, now: dict) -> list[str]:
    """'key: before -> now' for every leaf that differs (manifests, codec, settings, tokenizer)."""
    old, new = _flat(before), _flat(now)
    changed = [k for k in sorted(old | new) if old.get(k) != new.get(k)]
    return [f"{k}: {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in changed]


def _check_same_inputs(journal: Path, before: dict, now: dict) -> None:
    changes = fingerprint_changes(before, now)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise BuildError(
            f"--resume with other inputs than the interrupted build recorded in {journal}: {shown}. "
            "Resume with the same manifests, codec and settings, or start a fresh build in another --out directory"
        )


# ---------------------------------------------------------------- the journal


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Journal:
    """The build's fingerprint (first line), then one line per completed shard: that shard's index entry and
    the counters after it. Written by append + fsync, one shard's line at a time (not the whole list again),
    so an interrupted build resumes after its last complete shard and a line cut by a kill is dropped."""

    def __init__(self, path: Path, pattern: str, start: int, end: int):
        self.path, self.pattern, self.start, self.end = path, pattern, start, end

    def create(self, fingerprint: dict) -> None:
        header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "fingerprint": fingerprint}
        atomic_write_text(self.path, json.dumps(header, sort_keys=True) + "\n")

    def load(self) -> tuple[dict, list[dict]]:
        """(fingerprint, states); a torn last line is cut off the file so later appends follow good lines."""
        if not stat.S_ISREG(os.lstat(self.path).st_mode):
            raise self._bad(0, "is not a regular file")
        data = self.path.read_bytes()
        lines, offset, good_end = data.split(b"\n"), 0, 0
        header, states = None, []
        for number, raw in enumerate(lines, start=1):
            offset += len(raw) + 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                if offset < len(data):  # only the last line can be cut by a kill
                    raise self._bad(number, "is not JSON") from None
                break
            if header is None:
                header = self._check_header(obj, number)
            else:
                states.append(self._check_state(obj, number, states[-1] if states else None, len(states)))
            good_end = min(offset, len(data))
        if header is None:
            raise self._bad(1, "has no fingerprint line")
        if good_end < len(data) or not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                if not data[:good_end].endswith(b"\n"):  # a whole last line without its newline
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                os.fsync(f.fileno())
        return header["fingerprint"], states

    def append(self, state: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(state, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _bad(self, line: int, what: str) -> BuildError:
        where = f"{self.path}" + (f" line {line}" if line else "")
        return BuildError(
            f"{where} {what}: not a journal this version of higgs-ds wrote; start a fresh build in another "
            "--out directory"
        )

    def _check_header(self, obj, line: int) -> dict:
        ours = isinstance(obj, dict) and obj.get("format") == JOURNAL_FORMAT
        if not (ours and isinstance(obj.get("fingerprint"), dict)):
            raise self._bad(line, "has no fingerprint (written by an older higgs-ds?)")
        if obj.get("version") != JOURNAL_VERSION:
            raise self._bad(line, f"is journal version {obj.get('version')!r}, this higgs-ds reads {JOURNAL_VERSION}")
        return obj

    def _check_state(self, obj, line: int, previous: dict | None, position: int) -> dict:
        """One completed shard: its file name is the one this slice gives shard `position`, counters only grow."""
        keys = {"shard", "next_ordinal", "rejects_bytes", "accepted", "rejected", "audio_seconds", "reasons"}
        if not isinstance(obj, dict) or set(obj) - {"other_part"} != keys:  # other_part: a --split build's
            raise self._bad(line, f"is not a shard line (expected the keys {sorted(keys)})")
        shard = obj["shard"]
        if not isinstance(shard, dict) or shard.get("file") != self.pattern.format(position):
            raise self._bad(line, f"does not name shard {self.pattern.format(position)}")
        if not (isinstance(shard.get("sha256"), str) and _SHA256.fullmatch(shard["sha256"])):
            raise self._bad(line, "has no sha256 for its shard")
        if not all(_is_count(shard.get(k)) for k in ("bytes", "num_samples")):
            raise self._bad(line, "has no byte or sample count for its shard")
        counters = (
            "next_ordinal",
            "rejects_bytes",
            "accepted",
            "rejected",
            *(("other_part",) if "other_part" in obj else ()),
        )
        if not all(_is_count(obj[k]) for k in counters) or not self.start < obj["next_ordinal"] <= self.end:
            raise self._bad(
                line, f"has counters that are not counts within this slice's inputs ({self.start}-{self.end})"
            )
        if previous and any(obj[k] < previous[k] for k in counters):
            raise self._bad(line, "has counters smaller than the line before")
        if not isinstance(obj["audio_seconds"], int | float) or not isinstance(obj["reasons"], dict):
            raise self._bad(line, "has no audio seconds or reject reasons")
        if not all(isinstance(k, str) and _is_count(v) for k, v in obj["reasons"].items()):
            raise self._bad(line, "has reject reasons that are not counts")
        return obj


# ---------------------------------------------------------------- the output directory

LOCK_NAME = ".build.lock"


def lock_name(cfg: BuildConfig) -> str:
    """One lock per slice (the slices of a job array run in parallel); a whole build and a merge share one."""
    if cfg.num_slices == 1:
        return LOCK_NAME
    return f".build.slice-{cfg.slice_index:04d}-of-{cfg.num_slices:04d}.lock"


def _shard_name_re(pattern: str) -> str:
    head, tail = pattern.split("{:06d}")
    return re.escape(head) + r"\d{6}" + re.escape(tail)


def _remove_stale_temps(out: Path, pattern: str, names: list[str]) -> None:
    """Temp files a killed build of this slice left (a half-written shard, index or rejects); under the
    slice's lock nobody else writes them. Only names this slice's writers use are matched."""
    own = "|".join([_shard_name_re(pattern)] + [re.escape(n) for n in names])
    stale = re.compile(rf"\.({own})(\.\d+\.[0-9a-f]{{16}})?\.tmp")
    for path in out.iterdir():
        if stale.fullmatch(path.name) and stat.S_ISREG(os.lstat(path).st_mode):
            path.unlink()


def _check_journalled_shard(out: Path, shard: dict) -> None:
    path = out / shard["file"]
    hint = "start the build again in an empty --out directory"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BuildError(f"{path} is in the build journal but missing; {hint}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BuildError(f"{path} is not a regular file (a link or device?); {hint}")
    if st.st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
        raise BuildError(f"{path} does not match its journal entry (size or sha256); {hint}")


def _open_rejects(out: Path, rejects_name: str, state: dict | None):
    """The rejects being written, under a working name until the build publishes them as rejects_name.
    On resume: cut back to what the last journalled shard had seen."""
    work, final = out / f".{rejects_name}.building", out / rejects_name
    if state is None:  # never through a planted symlink: truncating would empty its target
        try:
            return os.fdopen(os.open(work, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "wb")
        except OSError as err:
            raise BuildError(f"{work} cannot be written ({err}): remove it, or use an empty --out directory") from None
    if not work.exists() and final.is_file():  # published, then killed before index.json was written
        os.replace(final, work)
    if not work.is_file() or work.stat().st_size < state["rejects_bytes"]:
        raise BuildError(
            f"{work} is missing or shorter than its journal says ({state['rejects_bytes']} bytes); "
            "start the build again in an empty --out directory"
        )
    f = open(work, "r+b")
    f.truncate(state["rejects_bytes"])
    f.seek(0, os.SEEK_END)
    return f


def _already_complete(index_path: Path, fingerprint: dict) -> dict:
    try:
        summary = json.loads(index_path.read_text())["build"]
        stored = summary.get("inputs_fingerprint")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise BuildError(f"{index_path} is not an index this version wrote; use another --out directory") from None
    if stored is not None and stored != inputs_digest(fingerprint):
        raise BuildError(
            f"{index_path} is a complete build of other inputs (manifests, codec or settings differ from this "
            "command's); run the same command to resume it, or build into another --out directory"
        )
    return summary | {"already_complete": True}


def build_shards(
    manifests: list[str],
    out_dir: str,
    codec_spec="tiny",
    cfg: BuildConfig = BuildConfig(),
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Build this slice's shards; returns the summary (also stored in the index under "build").
    codec_spec: 'tiny', a codec directory, or an already loaded Codec (saves loading it again).
    The output directory (or the slice) is locked for the whole build: a second builder fails at once."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, not a directory")
    for manifest in manifests:
        check_manifest_path(manifest)
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out, lock_name(cfg), what="shard build"):
        return _build_locked(manifests, out, codec_spec, cfg, device, progress)


def _build_locked(manifests: list[str], out: Path, codec_spec, cfg: BuildConfig, device: str, progress: bool) -> dict:
    from tqdm import tqdm

    from higgs_ds.shards.codec import resolve_codec

    started = time.time()
    pattern, index_name, rejects_name, journal_name = slice_names(cfg)
    if (out / index_name).exists() and not cfg.resume:
        raise BuildError(f"{out / index_name} exists: this build is complete; use another --out directory")
    has_shards = any(re.fullmatch(_shard_name_re(pattern), p.name) for p in out.iterdir())
    if not cfg.resume and (os.path.lexists(out / journal_name) or has_shards):
        raise BuildError(f"{out} holds shards of an unfinished build; pass --resume to continue it")
    complete = (out / index_name).exists()
    if cfg.resume and has_shards and not complete and not os.path.lexists(out / journal_name):
        raise BuildError(
            f"{out} holds shards but no build journal ({journal_name}): they cannot be resumed; "
            "start a fresh build in another --out directory"
        )
    own = [index_name, sidecar_name(index_name), rejects_name, journal_name, f".{rejects_name}.building"]
    _remove_stale_temps(out, pattern, own)

    total = count_inputs(manifests)
    if total == 0:
        raise BuildError(f"no input: {', '.join(map(str, manifests))} hold no non-blank lines")
    start, end = total * cfg.slice_index // cfg.num_slices, total * (cfg.slice_index + 1) // cfg.num_slices
    if isinstance(codec_spec, str):
        codec = resolve_codec(codec_spec, device=device)  # the driver needs provenance; workers load their own
    else:
        codec, codec_spec = codec_spec, codec_spec.path
    tokenizers, fingerprints = resolve_tokenizers(cfg.tokenizer)
    tokenizer_fingerprint, v3_fingerprint = fingerprints.get(V2), fingerprints.get(V3)
    fingerprint = build_fingerprint(manifests, codec.provenance, cfg, total, tokenizer_fingerprint, v3_fingerprint)
    if complete:  # --resume of a finished build (a requeued job): done, if of these inputs
        return _already_complete(out / index_name, fingerprint)

    journal = _Journal(out / journal_name, pattern, start, end)
    states: list[dict] = []
    if cfg.resume and os.path.lexists(journal.path):
        before, states = journal.load()
        _check_same_inputs(journal.path, before, fingerprint)
    else:
        journal.create(fingerprint)
    if cfg.min_shards > 1:  # small enough shards that the planned ranks x workers all get one
        cfg = replace(cfg, shard_samples=max(1, min(cfg.shard_samples, (end - start) // cfg.min_shards)))

    writer = ShardWriter(out, max_samples=cfg.shard_samples, max_bytes=cfg.shard_bytes, name_pattern=pattern)
    counts = {"accepted": 0, "rejected": 0, "other_part": 0, "audio_seconds": 0.0, "reasons": Counter()}
    next_ordinal = start
    state = states[-1] if states else None
    if state:
        for entry in states:
            _check_journalled_shard(out, entry["shard"])
        writer.restore([entry["shard"] for entry in states])
        counts.update(
            accepted=state["accepted"],
            rejected=state["rejected"],
            audio_seconds=state["audio_seconds"],
            reasons=Counter(state["reasons"]),
        )
        next_ordinal = state["next_ordinal"]
        counts["other_part"] = state.get("other_part", 0)  # counted like the others: a lying journal shows
    rejects = _open_rejects(out, rejects_name, state)

    def on_shard(last_ordinal: int) -> None:
        rejects.flush()
        os.fsync(rejects.fileno())  # durable before the journal says how long it is
        journal.append(
            {
                "shard": writer.shards[-1],
                "next_ordinal": last_ordinal + 1,
                "rejects_bytes": rejects.tell(),
                "accepted": counts["accepted"],
                "rejected": counts["rejected"],
                "audio_seconds": counts["audio_seconds"],
                "reasons": dict(counts["reasons"]),
                **({"other_part": counts["other_part"]} if cfg.split else {}),
            }
        )

    bar = tqdm(
        total=end - start,
        initial=next_ordinal - start,
        desc="shards build",
        unit="sample",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=2.0,
    )
    threads = max(1, (os.cpu_count() or 1) // max(cfg.workers, 1))
    split = parse_split(cfg.split) if cfg.split else None
    chunks = _chunks(manifests, next_ordinal, end, cfg.chunk, split, cfg.split_part)
    if cfg.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (codec_spec, device, tokenizers, threads))
        results = pool.imap(_encode_chunk_task, ((c, cfg) for c in chunks))
    else:
        pool = None
        _init_worker(codec_spec, device, tokenizers, os.cpu_count() or 1, codec)  # the driver's codec: load once
        results = (encode_chunk(c, cfg) for c in chunks)
    try:
        for chunk in results:
            for ordinal, item in chunk:
                if isinstance(item, Reject):
                    if cfg.fast_fail:
                        raise BuildError(
                            _one_line(f"{item.manifest}:{item.line} (sample {item.sample_id}): {item.reason}")
                            + " [--fast-fail; without it bad lines go to rejects.jsonl and the build goes on]"
                        )
                    # backslashreplace: a manifest file name that is not UTF-8 must not stop the build
                    rejects.write(
                        (json.dumps(item.to_json(), ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
                    )
                    counts["rejected"] += 1
                    counts["reasons"][reason_kind(item.reason)] += 1
                elif isinstance(item, OtherPart):
                    counts["other_part"] += 1
                else:
                    record, codes, seconds = item
                    counts["accepted"] += 1
                    counts["audio_seconds"] += seconds
                    if writer.write(f"{ordinal:09d}", record, codes, seconds):
                        on_shard(ordinal)
                bar.update(1)
            bar.set_postfix(audio_h=f"{counts['audio_seconds'] / 3600:.3f}", rejected=counts["rejected"])
    except BaseException:
        writer.abort()
        rejects.close()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    shards = writer.close()
    rejects.flush()
    rejects.close()
    num_inputs = end - start
    if counts["accepted"] + counts["rejected"] + counts["other_part"] != num_inputs:  # this function's invariant
        other = f" + {counts['other_part']} of the split's other part" if split is not None else ""
        raise CheckFailed(
            f"accounting error in {out}: {counts['accepted']} accepted + {counts['rejected']} rejected{other} != "
            f"{num_inputs} inputs; start the build again in an empty --out directory"
        )
    summary = {
        "inputs": num_inputs,
        "accepted": counts["accepted"],
        "rejected": counts["rejected"],
        "rejected_by_reason": dict(counts["reasons"]),
        "audio_hours": round(counts["audio_seconds"] / 3600, 4),
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "manifests": [str(m) for m in manifests],
        "slice": [cfg.slice_index, cfg.num_slices],
        "input_range": [start, end],
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "inputs_fingerprint": inputs_digest(fingerprint),
    }
    if v3_fingerprint:  # and none of these keys without a v3 tokenizer: such a build's index is as before
        summary.update(v3_tokenizer_fingerprint=v3_fingerprint, **v3_summary(shards))
    if split is not None:
        summary["split"] = {"spec": split.spec(), "part": cfg.split_part, "other_part": counts["other_part"]}
    # rejects (complete: every line was read), then the index (the mark of a complete build), then the
    # journal goes: each step durable before the next
    publish(out / f".{rejects_name}.building", out / rejects_name)
    if not shards and cfg.num_slices == 1:
        top = ", ".join(f"{n} x {kind}" for kind, n in counts["reasons"].most_common(3))
        if split is not None and counts["rejected"] == 0:
            raise BuildError(f"--split {split.spec()} leaves no sample in the {cfg.split_part} part of the "
                             f"{num_inputs} input lines: choose another split")  # fmt: skip
        raise BuildError(f"none of the {num_inputs} input lines was accepted ({top}); see {out / rejects_name}")
    write_index(out / index_name, shards, codec.provenance, summary, sidecar=cfg.num_slices == 1)  # slices: merged
    journal.path.unlink(missing_ok=True)
    fsync_dir(out)
    if len(shards) < cfg.min_shards:
        summary["warning"] = (
            f"only {len(shards)} shards for --min-shards {cfg.min_shards} (rejects shrank the set); "
            "rebuild with a smaller --shard-size"
        )
    return summary | {"wall_seconds": round(time.time() - started, 1)}


def _encode_chunk_task(args):
    chunk, cfg = args
    return encode_chunk(chunk, cfg)


def merge_slices(out_dir: str) -> dict:
    """Combine the slice indexes (and rejects) of a job-array build into index.json and rejects.jsonl.
    Holds the whole directory's lock and every slice's lock: refused while any slice build is running."""
    out = Path(out_dir)
    if not out.is_dir():
        raise BuildError(f"{out} is not a directory: nothing to merge")
    with contextlib.ExitStack() as locks:
        locks.enter_context(DirLock(out, LOCK_NAME, what="shard build"))
        for lock in sorted(out.glob(".build.slice-*.lock")):
            locks.enter_context(DirLock(out, lock.name, what="shard build"))
        return _merge_locked(out)


def _read_slice_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or not isinstance(index.get("build"), dict):
            raise ValueError("no build summary")
        _, num = index["build"]["slice"]
        return index
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise BuildError(f"{path} is not a slice index of a higgs-ds build ({err}); rebuild that slice") from None


def _merge_locked(out: Path) -> dict:
    parts = sorted(out.glob("index.slice-*-of-*.json"))
    if not parts:
        raise BuildError(f"no index.slice-*.json in {out}: nothing to merge")
    num = int(parts[0].name.split("-of-")[1].split(".")[0])
    indexes = [_read_slice_index(p) for p in parts]
    found = sorted(i["build"]["slice"][0] for i in indexes)
    if found != list(range(num)) or any(i["build"]["slice"][1] != num for i in indexes):
        missing = sorted(set(range(num)) - set(found))
        raise BuildError(f"{out} has slices {found} of {num}; missing {missing}: run those slices (or --resume them)")
    codecs = {json.dumps(i["codec"], sort_keys=True) for i in indexes}
    if len(codecs) != 1:
        raise BuildError(f"the slices in {out} were built with different codecs; rebuild them with one codec")
    inputs = {i["build"].get("inputs_fingerprint") for i in indexes}
    if len(inputs) != 1:
        raise BuildError(
            f"the slices in {out} were built from different manifests or settings (their inputs fingerprints "
            "differ); rebuild every slice with the same command"
        )
    indexes.sort(key=lambda i: i["build"]["slice"][0])
    merged = temp_path(out / REJECTS_NAME)
    try:
        with open(merged, "wb") as f:
            for i in range(num):
                with open(out / f"rejects.slice-{i:04d}-of-{num:04d}.jsonl", "rb") as part:
                    shutil.copyfileobj(part, f)
        publish(merged, out / REJECTS_NAME)
    finally:
        merged.unlink(missing_ok=True)
    fingerprints = {i["build"].get("tokenizer_fingerprint") for i in indexes}
    v3_fingerprints = {i["build"].get("v3_tokenizer_fingerprint") for i in indexes}
    summary = {
        "inputs": 0,
        "accepted": 0,
        "rejected": 0,
        "rejected_by_reason": Counter(),
        "audio_hours": 0.0,
        "shards": 0,
        "bytes": 0,
        "manifests": indexes[0]["build"]["manifests"],
        "slices": num,
        "tokenizer_fingerprint": fingerprints.pop() if len(fingerprints) == 1 else None,
        "inputs_fingerprint": inputs.pop(),
    }
    for i in indexes:
        for key in ("inputs", "accepted", "rejected", "shards", "bytes", "audio_hours"):
            summary[key] += i["build"][key]
        summary["rejected_by_reason"].update(i["build"]["rejected_by_reason"])
    summary["audio_hours"] = round(summary["audio_hours"], 4)
    summary["rejected_by_reason"] = dict(summary["rejected_by_reason"])
    shards = [s for i in indexes for s in i["shards"]]
    if v3_fingerprints != {None}:  # slices built with a v3 tokenizer (one inputs fingerprint: all of them)
        v3 = v3_fingerprints.pop() if len(v3_fingerprints) == 1 else None
        summary.update(v3_tokenizer_fingerprint=v3, **v3_summary(shards))
    write_index(out / INDEX_NAME, shards, indexes[0]["codec"], summary)
    return summary
