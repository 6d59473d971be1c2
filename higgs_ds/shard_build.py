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
* A journal line is written after each completed shard; `--resume` verifies the journalled shards and
  continues after the last one instead of starting again.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from higgs_ds.audio import AudioError, load_audio
from higgs_ds.codec import sha256_file
from higgs_ds.errors import UserError
from higgs_ds.manifest import ManifestSample, Reject, audio_items, check_manifest_path, iter_manifests, manifest_lines
from higgs_ds.shard_writer import INDEX_NAME, REJECTS_NAME, ShardWriter, write_index


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
    tokenizer: str | None = None
    """Model directory whose tokenizer gives exact expanded lengths (stored per sample and per shard)."""


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


def _init_worker(codec_spec: str, device: str, tokenizer: str | None, threads: int, codec=None) -> None:
    import torch

    from higgs_ds.codec import resolve_codec

    torch.set_num_threads(threads)
    _WORKER["codec"] = codec or resolve_codec(codec_spec, device=device)
    if tokenizer:
        from transformers import AutoTokenizer

        _WORKER["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer)


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
    """With --tokenizer: boson's token ids and the exact expanded length, stored in the sample's json."""
    tok = _WORKER.get("tokenizer")
    if tok is None:
        return {}
    from higgs_ds.encoding import chatml_tokens, clone_parts, expanded_length, plain_tts

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
    try:
        record.update(_tokens(sample.chatml, [i["frames"] for i in items], sample.sample_id))
    except UserError as err:
        return Reject(sample.manifest, sample.line, sample.sample_id, str(err))
    except Exception as err:  # noqa: BLE001 - boson's text processing, on text we do not control
        reason = f"the tokenizer could not encode this sample ({type(err).__name__}: {err})"
        return Reject(sample.manifest, sample.line, sample.sample_id, reason)
    return record, np.concatenate(codes, axis=1), total


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


def _chunks(manifests, start: int, end: int, size: int):
    chunk = []
    for ordinal, item in iter_manifests(manifests):
        if ordinal >= end:
            break
        if ordinal < start:
            continue
        chunk.append((ordinal, item))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Journal:
    """State after each completed shard, so an interrupted build resumes after its last complete shard."""

    def __init__(self, path: Path):
        self.path = path

    def last_state(self) -> dict | None:
        if not self.path.is_file():
            return None
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        states = []
        for line in lines:
            try:
                states.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it is good
        return states[-1] if states else None

    def append(self, state: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(state) + "\n")
            f.flush()
            os.fsync(f.fileno())


def build_shards(
    manifests: list[str],
    out_dir: str,
    codec_spec="tiny",
    cfg: BuildConfig = BuildConfig(),
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Build this slice's shards; returns the summary (also stored in the index under "build").
    codec_spec: 'tiny', a codec directory, or an already loaded Codec (saves loading it again)."""
    from tqdm import tqdm

    from higgs_ds.codec import resolve_codec

    started = time.time()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, not a directory")
    for manifest in manifests:
        check_manifest_path(manifest)
    out.mkdir(parents=True, exist_ok=True)
    pattern, index_name, rejects_name, journal_name = slice_names(cfg)
    if (out / index_name).exists():
        if cfg.resume:
            return json.loads((out / index_name).read_text())["build"] | {"already_complete": True}
        raise BuildError(f"{out / index_name} exists: this build is complete; use another --out directory")
    journal = _Journal(out / journal_name)
    state = journal.last_state() if cfg.resume else None
    if not cfg.resume and (journal.path.exists() or list(out.glob(pattern.replace("{:06d}", "*")))):
        raise BuildError(f"{out} holds shards of an unfinished build; pass --resume to continue it")

    total = count_inputs(manifests)
    if total == 0:
        raise BuildError(f"no input: {', '.join(map(str, manifests))} hold no non-blank lines")
    start, end = total * cfg.slice_index // cfg.num_slices, total * (cfg.slice_index + 1) // cfg.num_slices
    if cfg.min_shards > 1:  # small enough shards that the planned ranks x workers all get one
        cfg = replace(cfg, shard_samples=max(1, min(cfg.shard_samples, (end - start) // cfg.min_shards)))

    if isinstance(codec_spec, str):
        codec = resolve_codec(codec_spec, device=device)  # the driver needs provenance; workers load their own
    else:
        codec, codec_spec = codec_spec, codec_spec.path
    writer = ShardWriter(out, max_samples=cfg.shard_samples, max_bytes=cfg.shard_bytes, name_pattern=pattern)
    counts = {"accepted": 0, "rejected": 0, "audio_seconds": 0.0, "reasons": Counter()}
    next_ordinal = start
    if state:
        for shard in state["shards"]:
            if sha256_file(out / shard["file"]) != shard["sha256"]:
                raise BuildError(
                    f"{out / shard['file']} does not match its journal entry; start the build again "
                    f"in an empty directory"
                )
        writer.restore(state["shards"])
        counts.update(
            accepted=state["accepted"],
            rejected=state["rejected"],
            audio_seconds=state["audio_seconds"],
            reasons=Counter(state["reasons"]),
        )
        next_ordinal = state["next_ordinal"]
        with open(out / rejects_name, "r+b") as f:
            f.truncate(state["rejects_bytes"])
    rejects = open(out / rejects_name, "ab" if state else "wb")

    def on_shard(last_ordinal: int) -> None:
        rejects.flush()
        journal.append(
            {
                "shards": writer.shards,
                "next_ordinal": last_ordinal + 1,
                "rejects_bytes": rejects.tell(),
                "accepted": counts["accepted"],
                "rejected": counts["rejected"],
                "audio_seconds": counts["audio_seconds"],
                "reasons": dict(counts["reasons"]),
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
    chunks = _chunks(manifests, next_ordinal, end, cfg.chunk)
    if cfg.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (codec_spec, device, cfg.tokenizer, threads))
        results = pool.imap(_encode_chunk_task, ((c, cfg) for c in chunks))
    else:
        pool = None
        _init_worker(codec_spec, device, cfg.tokenizer, os.cpu_count() or 1, codec)  # the driver's codec: load once
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
                else:
                    record, codes, seconds = item
                    counts["accepted"] += 1
                    counts["audio_seconds"] += seconds
                    if writer.write(f"{ordinal:09d}", record, codes, seconds):
                        on_shard(ordinal)
                bar.update(1)
            bar.set_postfix(audio_h=f"{counts['audio_seconds'] / 3600:.3f}", rejected=counts["rejected"])
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    shards = writer.close()
    rejects.close()
    num_inputs = end - start
    if counts["accepted"] + counts["rejected"] != num_inputs:  # an invariant of this function
        raise BuildError(
            f"accounting error: {counts['accepted']} accepted + {counts['rejected']} rejected != {num_inputs} inputs"
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
        "tokenizer_fingerprint": _fingerprint(cfg.tokenizer),
    }
    if not shards and cfg.num_slices == 1:
        top = ", ".join(f"{n} x {kind}" for kind, n in counts["reasons"].most_common(3))
        raise BuildError(f"none of the {num_inputs} input lines was accepted ({top}); see {out / rejects_name}")
    write_index(out / index_name, shards, codec.provenance, summary)
    journal.path.unlink(missing_ok=True)
    if len(shards) < cfg.min_shards:
        summary["warning"] = (
            f"only {len(shards)} shards for --min-shards {cfg.min_shards} (rejects shrank the set); "
            "rebuild with a smaller --shard-size"
        )
    return summary | {"wall_seconds": round(time.time() - started, 1)}


def _fingerprint(tokenizer_dir: str | None) -> str | None:
    if not tokenizer_dir:
        return None
    from transformers import AutoTokenizer

    from higgs_ds.encoding import tokenizer_fingerprint

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer_dir))


def _encode_chunk_task(args):
    chunk, cfg = args
    return encode_chunk(chunk, cfg)


def merge_slices(out_dir: str) -> dict:
    """Combine the slice indexes (and rejects) of a job-array build into index.json and rejects.jsonl."""
    out = Path(out_dir)
    parts = sorted(out.glob("index.slice-*-of-*.json"))
    if not parts:
        raise BuildError(f"no index.slice-*.json in {out}: nothing to merge")
    num = int(parts[0].name.split("-of-")[1].split(".")[0])
    indexes = [json.loads(p.read_text()) for p in parts]
    found = sorted(i["build"]["slice"][0] for i in indexes)
    if found != list(range(num)) or any(i["build"]["slice"][1] != num for i in indexes):
        missing = sorted(set(range(num)) - set(found))
        raise BuildError(f"{out} has slices {found} of {num}; missing {missing}: run those slices (or --resume them)")
    codecs = {json.dumps(i["codec"], sort_keys=True) for i in indexes}
    if len(codecs) != 1:
        raise BuildError(f"the slices in {out} were built with different codecs; rebuild them with one codec")
    indexes.sort(key=lambda i: i["build"]["slice"][0])
    with open(out / REJECTS_NAME, "wb") as merged:
        for i in range(num):
            part = out / f"rejects.slice-{i:04d}-of-{num:04d}.jsonl"
            merged.write(part.read_bytes())
    fingerprints = {i["build"].get("tokenizer_fingerprint") for i in indexes}
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
    }
    for i in indexes:
        for key in ("inputs", "accepted", "rejected", "shards", "bytes", "audio_hours"):
            summary[key] += i["build"][key]
        summary["rejected_by_reason"].update(i["build"]["rejected_by_reason"])
    summary["audio_hours"] = round(summary["audio_hours"], 4)
    summary["rejected_by_reason"] = dict(summary["rejected_by_reason"])
    write_index(out / INDEX_NAME, [s for i in indexes for s in i["shards"]], indexes[0]["codec"], summary)
    return summary
