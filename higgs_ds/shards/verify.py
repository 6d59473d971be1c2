"""`higgs-ds shards verify DIR` and `higgs-ds shards stats DIR`: check and describe a shard set.

verify checks index.json's schema (a bad index is one named ShardError: the CLI exits 2), then every shard
on its own, and reports each bad shard with why, going on with the others: a regular file inside the
directory of the listed size (nothing else is opened: a fifo or /dev/zero is never read), its sha256 and
sample count, every tar header, and every sample decoded and checked as training does
(shard_format.check_sample: fields and types, uint16 (num_codebooks, T) codes below the codebook size,
T equal to its audio items' frames), plus each item's frames agreeing with its stored duration and, where
the index has them, each sample's length, speaker and clone_parts as its index.samples.npy (or an old
index's lists) records them, and likewise the Higgs TTS 3 ones (v3_length, v3_clone_parts against the
sample's "v3" entry) where the index has them (budget batching and cloning references rely on them).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.shards.format import REBUILD, shard_file_problem
from higgs_ds.shards.lengths import V3
from higgs_ds.shards.sample_table import NO_LENGTH, NO_SPEAKER, NOT_PLAIN, UNSIZED, SampleTable
from higgs_ds.stream.reader import ShardError, load_index, read_shard, sample_table
from higgs_ds.stream.tokens import plain_tts, speaker_of


def verify_shards(shard_dir: str, progress: bool = True) -> dict:
    from tqdm import tqdm

    index = load_index(shard_dir, check_files=False)  # a bad index is fatal; a missing shard is reported
    table = sample_table(shard_dir, index)  # so is a bad sidecar: every shard's per-sample values are in it
    problems: dict[str, str] = {}
    checked = 0
    for k, shard in enumerate(tqdm(index["shards"], desc="verify", unit="shard", disable=not progress)):
        path = Path(shard_dir) / shard["file"]
        try:
            checked += _verify_shard(shard_dir, shard, index["codec"], _IndexSamples(table, k))
        except UserError as err:
            problems[str(path)] = str(err).removeprefix(f"{path}: ").removeprefix(f"{path} ")
        except Exception as err:  # noqa: BLE001 - a shard no check foresaw is still reported, and the rest checked
            problems[str(path)] = f"cannot be checked ({type(err).__name__}: {err}); {REBUILD}"
    return {"shards": len(index["shards"]), "samples_checked": checked, "bad_shards": problems}


class _IndexSamples:
    """What the index records about each sample of shard k, as the writer recorded it from the sample."""

    def __init__(self, table: SampleTable, k: int):
        self.names = table.speaker_names
        self.lengths, self.speakers, self.parts = table.shard_fields(k)
        has_v3 = table.v3_recorded is not None and table.v3_recorded[k]
        self.v3_lengths, _, self.v3_parts = table.shard_fields(k, V3) if has_v3 else (None, None, None)

    def speaker(self, i: int) -> str | None:
        sid = int(self.speakers[i])
        return None if sid == NO_SPEAKER else self.names[sid]

    def clone_parts(self, i: int) -> list | None:
        head, pair = (int(p) for p in self.parts[i])
        return None if (head, pair) == NOT_PLAIN else [None, None] if (head, pair) == UNSIZED else [head, pair]

    def v3(self, i: int) -> dict:
        """The sample's "v3" entry as the writer recorded it (shards.lengths)."""
        length, (head, pair) = int(self.v3_lengths[i]), (int(p) for p in self.v3_parts[i])
        return {
            "expanded_length": None if length == NO_LENGTH else length,
            "clone_parts": None if (head, pair) == NOT_PLAIN else [head, pair],
        }


def _verify_shard(shard_dir: str, shard: dict, codec: dict, recorded: _IndexSamples) -> int:
    """Samples in the shard, or the ShardError of its first problem."""
    problem = shard_file_problem(shard_dir, shard)
    if problem:
        raise ShardError(problem)
    count = 0
    for position, record in read_shard(str(Path(shard_dir) / shard["file"])):
        _check_durations(record, codec)
        _check_index_entry(recorded, position, record)
        count += 1
    return count


def _check_durations(record: dict, codec: dict) -> None:
    meta = record["json"]
    for item in meta["audio"]:
        expected = math.ceil(round(item["seconds"] * codec["sample_rate"]) / codec["hop_length"])
        if not expected - 1 <= item["frames"] <= expected:
            raise ShardError(
                f"sample {meta['id']!r}: {item['frames']} frames for {item['seconds']} s (expected {expected})"
            )


def _check_index_entry(recorded: _IndexSamples, i: int, record: dict) -> None:
    """The index's per-sample length, speaker and clone_parts (where recorded) agree with the sample itself."""
    meta, sid = record["json"], record["json"]["id"]
    if recorded.lengths is not None and int(recorded.lengths[i]) != meta.get("expanded_length"):
        raise ShardError(
            f"sample {sid!r}: the index says length {int(recorded.lengths[i])}, the sample "
            f"{meta.get('expanded_length')!r}"
        )
    if recorded.speakers is not None and recorded.speaker(i) != speaker_of(meta):
        said = recorded.speaker(i)
        raise ShardError(f"sample {sid!r}: the index says speaker {said!r}, the sample {speaker_of(meta)!r}")
    if recorded.v3_lengths is not None and recorded.v3(i) != meta.get("v3"):
        raise ShardError(f"sample {sid!r}: the index says v3 lengths {recorded.v3(i)}, the sample {meta.get('v3')!r}")
    v3 = meta.get("v3") or {}
    if v3.get("clone_parts") and -(-sum(v3["clone_parts"]) // 8) * 8 != v3["expanded_length"]:
        raise ShardError(f"sample {sid!r}: v3 clone_parts {v3['clone_parts']} do not add up to its v3 length")
    if recorded.parts is None:
        return
    parts = recorded.clone_parts(i)
    if parts != (meta.get("clone_parts", [None, None]) if plain_tts(meta) else None):  # as the writer records it
        raise ShardError(f"sample {sid!r}: the index's clone_parts {parts} do not match the sample")
    if parts and None not in parts and recorded.lengths is not None and -(-sum(parts) // 8) * 8 != recorded.lengths[i]:
        raise ShardError(f"sample {sid!r}: clone_parts {parts} do not add up to its length {int(recorded.lengths[i])}")


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
