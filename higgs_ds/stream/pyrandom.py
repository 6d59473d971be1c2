"""Python's `random` streams, drawn with numpy where that is faster: the same numbers.

The epoch plan is defined by `random.Random(key)` streams (shuffles of each shard, the cloning draws), so a
plan computed today equals one computed by any earlier higgs-ds. Shuffles stay CPython's algorithm in
Python, tightened (0.22 us per element against random.shuffle's 0.42; a numpy version, one vector step per
position across many streams, measured 0.37 us: the rejection sampling is sequential within a stream).
The cloning draws are plain `random()` values, two 32-bit outputs each with no
rejection, so millions of them come from numpy's MT19937 in the state CPython's string seeding leaves
(taken from `getstate`, not re-implemented): `random()` = ((a >> 5) * 2**26 + (b >> 6)) / 2**53.
tests/test_plan_equality.py checks both against CPython.
"""

from __future__ import annotations

import random

import numpy as np


def generator(key: str) -> np.random.MT19937:
    """numpy's MT19937 in the state of `random.Random(key)`: random_raw() gives its 32-bit outputs."""
    _, words, _ = random.Random(key).getstate()
    bits = np.random.MT19937()
    bits.state = {
        "bit_generator": "MT19937",
        "state": {"key": np.asarray(words[:624], dtype=np.uint32), "pos": int(words[624])},
    }
    return bits


def random_floats(key: str, count: int) -> np.ndarray:
    """The first `count` values of `random.Random(key).random()`, as float64."""
    raw = generator(key).random_raw(2 * count).astype(np.uint64)
    a, b = raw[0::2] >> np.uint64(5), raw[1::2] >> np.uint64(6)
    return (a.astype(np.float64) * 67108864.0 + b.astype(np.float64)) * (1.0 / 9007199254740992.0)


def shuffled(key: str, values) -> np.ndarray:
    """`x = list(values); random.Random(key).shuffle(x)`, as an int64 array: CPython's algorithm (swap
    x[m - 1] with x[_randbelow(m)] for m from len down to 2) with `getrandbits` bound locally and the bit
    count computed once per power of two instead of per element, twice as fast as random.shuffle."""
    x = values.tolist() if isinstance(values, np.ndarray) else list(values)
    getrandbits = random.Random(key).getrandbits
    top, bits = len(x), len(x).bit_length()
    while top >= 2:
        low = max(2, 1 << (bits - 1))  # every m in [low, top] has this bit count
        for m in range(top, low - 1, -1):
            j = getrandbits(bits)
            while j >= m:
                j = getrandbits(bits)
            x[m - 1], x[j] = x[j], x[m - 1]
        top, bits = low - 1, bits - 1
    return np.asarray(x, dtype=np.int64)
