"""Planning at scale, printed as one JSON object: one rank's epoch plan and the whole job's preflight totals
for samples x ranks up to 10M x 1,024, the array plan (higgs_ds.stream.plan) against the list plan it
replaced (tests/reference/plan_v1.py), each measurement in a fresh process (time and peak RSS of that
process alone, imports and the synthetic index built before the clock).

    python bench/scale.py [--grid 100000x8,1000000x256,10000000x1024] [--old-limit 120]

The synthetic shard set: 1,000 samples per shard, expanded lengths 64-2,048 (log-uniform), 40 speakers per
directory, half the samples plain single-speaker TTS (cloning-eligible). The plan: budget batching
(max_tokens 8,192, windows of 512, max_length 2,048), so every rank's batch count is needed; `--clone`
adds cloning references (0.3) and two directories mixed 1 : 0.5. The old plan is given `--old-limit`
seconds per measurement; past that it is reported as not finished (the README has its measured 370 s).
An elastic resume (the rest of an epoch stopped half-way, on 3/4 of the ranks) is timed too, against one
rank's plan of the same row (`resume_over_rank_plan`: a resume forms every old rank's batch sizes but only
this rank's samples, so it should cost about one rank's plan).
Goals (issue #12): one rank's plan <= 10 s and <= 1 GB peak RSS at 10M x 1,024; preflight <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PER_SHARD = 1000


def synthetic_refs(samples: int, module, mixed: bool):
    """ShardRefs as the index reader gives them (int arrays; speaker ids per directory)."""
    import numpy as np

    rng = np.random.default_rng(0)
    refs = []
    shards = -(-samples // PER_SHARD)
    for s in range(shards):
        n = min(PER_SHARD, samples - s * PER_SHARD)
        lengths = np.exp(rng.uniform(np.log(64), np.log(2048), n)).astype(np.int32) // 8 * 8
        plain = rng.random(n) < 0.5
        head = np.where(plain, 40, -1).astype(np.int32)
        pair = np.where(plain, lengths - 40, -1).astype(np.int32)
        refs.append(
            module.ShardRef(
                f"set{s % 2 if mixed else 0}/shard-{s:06d}.tar",
                n,
                lengths,
                dataset=s % 2 if mixed else 0,
                speakers=rng.integers(0, 40, n).astype(np.int32),
                clone_parts=np.stack([head, pair], axis=1),
            )
        )
    return refs


def _as_tuples(refs, module):
    out = []
    for r in refs:
        parts = tuple(None if h < 0 else (int(h), int(p)) for h, p in r.clone_parts.tolist())
        out.append(module.ShardRef(r.path, r.num_samples, tuple(r.lengths.tolist()), r.dataset,
                                   tuple(f"spk{x}" for x in r.speakers.tolist()), parts))  # fmt: skip
    return out


def one(samples: int, ranks: int, impl: str, what: str, clone: bool) -> dict:
    """Runs in its own process: build the index, then time one rank's plan (or the preflight totals)."""
    import resource

    sys.path.insert(0, str(ROOT))
    from higgs_ds.stream import plan as new_plan

    module = new_plan
    refs = synthetic_refs(samples, new_plan, clone)  # built as the index reader gives them
    if impl == "old":
        from tests.reference import plan_v1 as module

        refs = _as_tuples(refs, module)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mixing = {"weights": (1.0, 0.5), "clone_references": 0.3} if clone else {}
    cfg = module.BatchingConfig(max_tokens=8192, max_length=2048, window=512, **mixing)
    start = time.perf_counter()
    if what == "rank":
        plan = module.plan_epoch(refs, cfg, seed=0, epoch=0, rank=ranks // 2, world_size=ranks)
        batches = len(plan.batches)
    elif what == "resume":  # stopped half-way through the epoch, resumed on 3/4 of the ranks
        from higgs_ds.stream.elastic import resumed_plan

        layout = module.EpochLayout(refs, cfg, seed=0, epoch=0, world_size=ranks)
        now = max(1, ranks * 3 // 4)
        batches = len(resumed_plan(layout, [(ranks, layout.target // 2)], now // 2, now).batches)
    elif impl == "new":  # preflight: the totals over all ranks from one layout
        layout = module.EpochLayout(refs, cfg, seed=0, epoch=0, world_size=ranks)
        layout.total_repeated()
        batches = len(layout.rank_plan(0).batches)
    else:  # the old preflight: a plan per rank
        batches = len(module.plan_epoch(refs, cfg, seed=0, epoch=0, rank=0, world_size=ranks).batches)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1024), "rss_before_plan_mb": round(before / 1024),
            "batches_per_rank": batches}  # fmt: skip


def measure(samples: int, ranks: int, impl: str, what: str, clone: bool, limit: float) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{samples}x{ranks}", impl, what, str(int(clone))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {"finished": False, "limit_s": limit}
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="100000x8,1000000x256,10000000x1024", help="samples x ranks, comma-separated")
    ap.add_argument("--old-limit", type=float, default=120, help="seconds the old plan gets per measurement")
    ap.add_argument("--new-limit", type=float, default=600)
    ap.add_argument("--clone", action="store_true", help="also cloning references 0.3 and mixing 1 : 0.5")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        size, impl, what, clone = args.one
        samples, ranks = (int(x) for x in size.split("x"))
        print(json.dumps(one(samples, ranks, impl, what, bool(int(clone)))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    rows = []
    for cell in args.grid.split(","):
        samples, ranks = (int(x) for x in cell.split("x"))
        for clone in (False, True) if args.clone else (False,):
            row = {"samples": samples, "ranks": ranks, "clone_and_mix": clone}
            for impl, limit in (("new", args.new_limit), ("old", args.old_limit)):
                row[f"{impl}_rank_plan"] = measure(samples, ranks, impl, "rank", clone, limit)
            row["new_preflight"] = measure(samples, ranks, "new", "preflight", clone, args.new_limit)
            row["new_elastic_resume_plan"] = measure(samples, ranks, "new", "resume", clone, args.new_limit)
            resume, rank = row["new_elastic_resume_plan"].get("seconds"), row["new_rank_plan"].get("seconds")
            if resume and rank:
                row["resume_over_rank_plan"] = round(resume / rank, 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    out = {
        "machine": machine(),
        "settings": {
            "samples_per_shard": PER_SHARD,
            "max_tokens": 8192,
            "max_length": 2048,
            "window": 512,
            "old_limit_s": args.old_limit,
        },  # fmt: skip
        "rows": rows,
        "notes": "seconds: wall time of planning alone (index built before the clock); peak_rss_mb: the "
        "process's peak RSS including the synthetic index; old = tests/reference/plan_v1.py, the list plan "
        "every rank computed for every rank; preflight = all ranks' totals + rank 0's plan (old: a plan per "
        "rank, i.e. ranks x old_rank_plan); elastic_resume_plan = one rank's plan for the rest of an epoch stopped "
        "half-way and resumed on 3/4 of the ranks (every old rank's batch sizes, this rank's samples; "
        "higgs_ds.stream.elastic).",
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
