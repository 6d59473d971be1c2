"""Index load at scale, printed as one JSON object: a shard set's index read into per-sample arrays, the
schema-2 sidecar (index.json summary + index.samples.npy, sha256 and range checks included) against the
schema-1 index.json that held per-shard lists, each in a fresh process after the imports.

    python bench/index_load.py [--samples 1000000,10000000] [--old-max 1000000]

The synthetic set (tests/test_index_sidecar.py synthetic_set): 1,000 samples per shard, 50,000 speakers,
expanded lengths and clone parts for every sample; the schema-1 twin holds the same values as JSON lists.
Only the index is read (no shard files). Goal (issue #12): <= 5 s for 10M samples.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, resource, sys, time
from higgs_ds.stream.reader import load_index, sample_table
root = sys.argv[1]
start = time.perf_counter()
index = load_index(root, check_files=False)
table = sample_table(root, index)
views = [table.shard_fields(k) for k in range(len(index["shards"]))]
seconds = time.perf_counter() - start
print(json.dumps({"seconds": round(seconds, 3), "rows": int(len(table.rows)),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def _schema_1(new: Path, old: Path) -> None:
    """The same index as an older higgs-ds wrote it: per-shard lists in index.json, no sidecar."""
    import numpy as np

    index = json.loads((new / "index.json").read_text())
    rows = np.load(new / index["sample_table"]["file"], allow_pickle=False)
    names = index["speaker_table"]
    start = 0
    for shard in index["shards"]:
        part = rows[start : start + shard["num_samples"]]
        start += shard["num_samples"]
        shard["lengths"] = part["length"].tolist()
        shard["speakers"] = [names[i] if i >= 0 else None for i in part["speaker"].tolist()]
        shard["clone_parts"] = [None if h == -1 else [h, p] for h, p in part["clone_parts"].tolist()]
    for key in ("sample_table", "speaker_table"):
        del index[key]
    index["schema_version"] = 1
    old.mkdir()
    (old / "index.json").write_text(json.dumps(index))


def _load(root: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default="1000000,10000000")
    ap.add_argument("--old-max", type=int, default=1000000, help="largest set also written and read as schema 1")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine

    from tests.test_index_sidecar import synthetic_set

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.samples.split(",")):
            new = Path(tmp) / f"new{n}"
            synthetic_set(new, shards=-(-n // 1000), per_shard=1000, speakers=50000)
            row = {"samples": n, "index_json_mb": round((new / "index.json").stat().st_size / 2**20, 2),
                   "sidecar_mb": round((new / "index.samples.npy").stat().st_size / 2**20, 1)}  # fmt: skip
            _load(new)  # warm-up: page cache, as for the other
            row["schema_2_sidecar"] = _load(new)
            if n <= args.old_max:
                old = Path(tmp) / f"old{n}"
                _schema_1(new, old)
                row["schema_1_json_mb"] = round((old / "index.json").stat().st_size / 2**20, 1)
                _load(old)
                row["schema_1_lists"] = _load(old)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"machine": machine(), "rows": rows, "notes": "seconds: index.json parsed, the per-sample "
                      "table read and checked (schema 2: sha256 of the sidecar, dtype, shape and ranges; schema 1: "
                      "the lists converted), and every shard's views made; one warm-up load first, each load in "
                      "a fresh process, imports outside the clock."}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
