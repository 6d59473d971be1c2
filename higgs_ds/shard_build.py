"""The shard builder: manifests -> audio -> codec codes -> shards + index + rejects.

    higgs-ds shards build MANIFEST [MANIFEST ...] --out DIR --codec tiny|PATH

Audio is decoded, resampled to 24 kHz and encoded once here, so training never touches waveforms.
Each input line ends up either in a shard or in DIR/rejects.jsonl with its reason; the summary counts
both and the build fails if they do not add up to the input.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_ds.audio import AudioError, load_audio
from higgs_ds.errors import UserError
from higgs_ds.manifest import ManifestSample, Reject, audio_items, read_manifest
from higgs_ds.shard_writer import REJECTS_NAME, ShardWriter, write_index


@dataclass(frozen=True)
class BuildConfig:
    max_seconds: float = 30.0
    """Longest audio item accepted, in seconds; longer items are rejected, never truncated."""
    max_sample_seconds: float = 120.0
    """Longest total audio per sample (references + targets), in seconds."""
    shard_samples: int = 1000
    """Samples per shard (a shard also closes at shard_bytes)."""
    shard_bytes: int = 256 << 20
    fast_fail: bool = False
    """Stop at the first bad sample instead of recording it in rejects.jsonl."""


class BuildError(UserError):
    pass


def _encode_sample(sample: ManifestSample, codec, cfg: BuildConfig, cache: dict) -> tuple[dict, np.ndarray, float, int]:
    codes_list, items, total_seconds = [], [], 0.0
    target_frames = 0
    start = sample.chatml.get("start_index") or 0
    for (msg_index, item), path in zip(audio_items(sample.chatml["messages"]), sample.audio_paths, strict=True):
        if path not in cache:
            wave = load_audio(path, codec.provenance["sample_rate"])
            seconds = len(wave) / codec.provenance["sample_rate"]
            if seconds > cfg.max_seconds:
                raise AudioError(f"audio is {seconds:.1f} s, over --max-seconds {cfg.max_seconds:g}: {path}")
            cache[path] = (codec.encode(wave), seconds)
        codes, seconds = cache[path]
        total_seconds += seconds
        codes_list.append(codes)
        items.append({"url": item["audio_url"], "frames": int(codes.shape[1]), "seconds": round(seconds, 3)})
        if sample.chatml["messages"][msg_index]["role"] == "assistant" and msg_index >= start:
            target_frames += int(codes.shape[1])
    if total_seconds > cfg.max_sample_seconds:
        raise AudioError(f"sample holds {total_seconds:.1f} s of audio, over {cfg.max_sample_seconds:g} s")
    record = dict(
        sample.chatml, id=sample.sample_id, source={"manifest": sample.manifest, "line": sample.line}, audio=items
    )
    return record, np.concatenate(codes_list, axis=1), total_seconds, target_frames


def build_shards(
    manifests: list[str], out_dir: str, codec, cfg: BuildConfig = BuildConfig(), progress: bool = True
) -> dict:
    """Build shards; returns the summary (also stored in index.json under "build")."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    writer = ShardWriter(out, max_samples=cfg.shard_samples, max_bytes=cfg.shard_bytes)
    reasons: Counter = Counter()
    num_inputs = accepted = 0
    audio_seconds = 0.0
    cache: dict = {}  # path -> (codes, seconds): a clip used by several samples is encoded once
    bar = tqdm(desc="shards build", unit="sample", disable=not progress, dynamic_ncols=True, mininterval=2.0)
    with open(out / REJECTS_NAME, "w") as rejects:
        for manifest in manifests:
            for item in read_manifest(manifest):
                num_inputs += 1
                if isinstance(item, ManifestSample):
                    try:
                        record, codes, seconds, target_frames = _encode_sample(item, codec, cfg, cache)
                    except AudioError as err:
                        item = Reject(item.manifest, item.line, item.sample_id, str(err))
                    else:
                        writer.write(record, codes, seconds, target_frames)
                        accepted += 1
                        audio_seconds += seconds
                if isinstance(item, Reject):
                    if cfg.fast_fail:
                        raise BuildError(f"{item.manifest}:{item.line} ({item.sample_id}): {item.reason}")
                    rejects.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
                    reasons[item.reason.split(":")[0]] += 1
                bar.update(1)
                bar.set_postfix(audio_h=f"{audio_seconds / 3600:.3f}", rejected=sum(reasons.values()))
    bar.close()
    shards = writer.close()
    rejected = sum(reasons.values())
    if accepted + rejected != num_inputs:  # an invariant of this function, checked on every build
        raise BuildError(f"accounting error: {accepted} accepted + {rejected} rejected != {num_inputs} inputs")
    summary = {
        "inputs": num_inputs,
        "accepted": accepted,
        "rejected": rejected,
        "rejected_by_reason": dict(reasons),
        "audio_hours": round(audio_seconds / 3600, 4),
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "manifests": [str(m) for m in manifests],
    }
    if not shards:
        raise BuildError(f"no sample was accepted from {manifests}; see {out / REJECTS_NAME}")
    write_index(out, shards, codec.provenance, summary)
    return summary | {"wall_seconds": round(time.time() - started, 1)}
