"""What every benchmark here shares: one timing rule for every path, and a description of the machine.

Every path is timed the same way: `warmup` untimed passes (imports done, caches and page cache warm, the
codec's first-call costs paid), then `repeats` timed passes, reporting the median. The thing to time is a
`prepare()` that does the per-pass setup outside the clock (a fresh loader, cleared caches, a fresh output
folder) and returns the zero-argument function whose run is timed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

WARMUP, REPEATS = 1, 3


def measure(prepare, warmup: int = WARMUP, repeats: int = REPEATS) -> dict:
    """Median wall and process-CPU seconds of `repeats` passes after `warmup` passes, and every pass's."""
    for _ in range(warmup):
        prepare()()
    walls, cpus = [], []
    for _ in range(repeats):
        run = prepare()
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return {
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "passes_wall_s": [round(w, 4) for w in walls],
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "python": platform.python_version(),
    }


def timing_settings(warmup: int = WARMUP, repeats: int = REPEATS) -> dict:
    return {"warmup_passes": warmup, "timed_passes": repeats, "statistic": "median"}
