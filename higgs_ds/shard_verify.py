"""`higgs-ds shards verify DIR` and `higgs-ds shards stats DIR`: check and describe a shard set.

verify re-hashes every shard against index.json, decodes every sample and checks its codes (uint16,
(num_codebooks, T), every code < codebook size, T agreeing with the stored duration and frame counts);
it returns one problem per bad shard, naming the shard and why. Where the index has them, it also checks
each sample's speaker and clone_parts in the index against the sample (cloning references rely on them).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from higgs_ds.codec import sha256_file
from higgs_ds.encoding import plain_tts, speaker_of
from higgs_ds.shard_reader import ShardError, load_index, read_shard


def verify_shards(shard_dir: str, progress: bool = True) -> dict:
    from tqdm import tqdm

    index = load_index(shard_dir, check_files=False)  # a missing shard is reported, not fatal
    codec = index["codec"]
    problems: dict[str, str] = {}
    checked = 0
    for shard in tqdm(index["shards"], desc="verify", unit="shard", disable=not progress):
        path = Path(shard_dir) / shard["file"]
        try:
            if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                raise ShardError("size or sha256 differs from index.json (the file changed after the build)")
            count = 0
            for position, record in read_shard(str(path)):
                _check_record(record, codec)
                _check_index_entry(shard, position, record)
                count += 1
            if count != shard["num_samples"]:
                raise ShardError(f"holds {count} samples, index.json says {shard['num_samples']}")
            checked += count
        except (ShardError, OSError) as err:
            problems[str(path)] = str(err).removeprefix(f"{path}: ")
    return {"shards": len(index["shards"]), "samples_checked": checked, "bad_shards": problems}


def _check_record(record: dict, codec: dict) -> None:
    meta, codes = record.get("json"), record.get("codes")
    if meta is None or codes is None:
        raise ShardError(f"a sample lacks its {'json' if meta is None else 'codes.npy'} member")
    sid = meta.get("id")
    if codes.shape[0] != codec["num_codebooks"]:
        raise ShardError(f"sample {sid!r}: codes have {codes.shape[0]} codebooks, expected {codec['num_codebooks']}")
    if codes.size and int(codes.max()) >= codec["codebook_size"]:
        raise ShardError(f"sample {sid!r}: code {int(codes.max())} >= codebook size {codec['codebook_size']}")
    frames = [a["frames"] for a in meta["audio"]]
    if sum(frames) != codes.shape[1]:
        raise ShardError(f"sample {sid!r}: codes hold {codes.shape[1]} frames, its audio items {sum(frames)}")
    for item in meta["audio"]:
        expected = math.ceil(round(item["seconds"] * codec["sample_rate"]) / codec["hop_length"])
        if not expected - 1 <= item["frames"] <= expected:
            raise ShardError(f"sample {sid!r}: {item['frames']} frames for {item['seconds']} s (expected {expected})")


def _check_index_entry(shard: dict, i: int, record: dict) -> None:
    """The index's per-sample speaker and clone_parts (when recorded) agree with the sample itself."""
    meta, sid = record["json"], record["json"].get("id")
    for key in ("speakers", "clone_parts", "lengths"):
        if key in shard and len(shard[key]) != shard["num_samples"]:
            raise ShardError(f"index.json lists {len(shard[key])} {key} for {shard['num_samples']} samples")
    if "speakers" in shard and shard["speakers"][i] != speaker_of(meta):
        raise ShardError(
            f"sample {sid!r}: index.json says speaker {shard['speakers'][i]!r}, the sample {speaker_of(meta)!r}"
        )
    if "clone_parts" not in shard:
        return
    parts = shard["clone_parts"][i]
    if parts != (meta.get("clone_parts", [None, None]) if plain_tts(meta) else None):  # as the writer records it
        raise ShardError(f"sample {sid!r}: index.json's clone_parts {parts} do not match the sample")
    if parts and parts[0] is not None and "lengths" in shard and -(-sum(parts) // 8) * 8 != shard["lengths"][i]:
        raise ShardError(f"sample {sid!r}: clone_parts {parts} do not add up to its length {shard['lengths'][i]}")


def shard_stats(shard_dir: str, plot: str | None = None) -> dict:
    index = load_index(shard_dir)
    durations, expanded, speakers = [], [], Counter()
    for shard in index["shards"]:
        for _, record in read_shard(str(Path(shard_dir) / shard["file"])):
            meta = record["json"]
            durations.append(sum(a["seconds"] for a in meta["audio"]))
            speakers[meta.get("speaker") or "(none)"] += 1
            if "expanded_length" in meta:
                expanded.append(meta["expanded_length"])
    result = {
        "samples": len(durations),
        "audio_hours": round(sum(durations) / 3600, 4),
        "speakers": len(speakers),
        "samples_per_speaker": dict(speakers.most_common()),
        "shards": len(index["shards"]),
        "duration_s": _summary(durations),
        "expanded_length": _summary(expanded) if expanded else None,
    }
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2 if expanded else 1, figsize=(10 if expanded else 5, 3.5), squeeze=False)
        axes[0][0].hist(durations, bins=30)
        axes[0][0].set(title="audio per sample", xlabel="seconds", ylabel="samples")
        if expanded:
            axes[0][1].hist(expanded, bins=30)
            axes[0][1].set(title="expanded length", xlabel="positions")
        fig.suptitle(f"{shard_dir}: {len(durations)} samples, {result['audio_hours']} h, {len(speakers)} speakers")
        fig.tight_layout()
        fig.savefig(plot, dpi=100)
        result["plot"] = plot
    return result


def _summary(values: list) -> dict:
    ordered = sorted(values)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "min": ordered[0],
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 3),
    }


def print_json(obj) -> None:
    print(json.dumps(obj, indent=1))
