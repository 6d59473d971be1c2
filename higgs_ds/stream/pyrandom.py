"""Python's `random` streams, drawn with numpy where that is faster: the same numbers.

The epoch plan is defined by `random.Random(key)` streams (shuffles of each shard, the cloning draws), so a
plan computed today equals one computed by any earlier higgs-ds. CPython's own shuffle is already about
0.25 us per element (a numpy version, one vector step per position across many streams, measured 0.37 us:
the rejection sampling is sequential within a stream), so shuffles stay CPython's. The cloning draws are
plain `random()` values, two 32-bit outputs each with no rejection, so millions of them come from numpy's
MT19937 in the state CPython's string seeding leaves (taken from `getstate`, not re-implemented):
`random()` = ((a >> 5) * 2**26 + (b >> 6)) / 2**53. tests/test_pyrandom.py checks both against CPython.
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
    """`x = list(values); random.Random(key).shuffle(x)`, as an int64 array."""
    x = values.tolist() if isinstance(values, np.ndarray) else list(values)
    random.Random(key).shuffle(x)
    return np.asarray(x, dtype=np.int64)
