"""CPython's `random` draws as the plan uses them, made faster with the same results: `random.sample` of a
range (the chosen set) without its pool of Python ints, and runs of `random()` values a chunk at a time.

The fractional pass of a mixing weight is the set `random.Random(key).sample(range(n), k)` chose
(tests/reference/plan_v1.py defines it that way), and at 5M samples CPython's sample takes ~3.7 s and a
list of n ints (~36 bytes each). The same draws are made here, in CPython's two branches (Lib/random.py):

* the pool branch (a list of n is smaller than a set of k): a partial Fisher-Yates, step m = n, n-1, ...
  drawing j = randbelow(m) and moving pool[j] out; swapping pool[j] with pool[m-1] instead leaves the chosen
  ones in pool[n-k:], the same set. The pool is an int32 array walked through a memoryview (0.4 us a step,
  2.5x faster than the list, 4 bytes a sample);
* the set branch: randbelow(n) draws, repeats drawn again; all draws have one bit count, so they are plain
  32-bit outputs shifted (numpy's MT19937 in CPython's state) and the chosen set is the first k distinct
  values below n, found with arrays.

randbelow(m) is CPython's: getrandbits(m.bit_length()) until below m; getrandbits(b <= 32) is one 32-bit
output shifted right by 32 - b; random() is two outputs a and b: ((a >> 5) * 2**26 + (b >> 6)) / 2**53.
tests/test_plan_equality.py compares with random.sample and random().
"""

from __future__ import annotations

import math
import random

import numpy as np

from higgs_ds.stream.pyrandom import generator


def sample_set(key: str, n: int, k: int) -> np.ndarray:
    """`sorted(random.Random(key).sample(range(n), k))` as an int64 array."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n}")
    if n >= 1 << 31:  # draws of more than 32 bits take several outputs: CPython's own code
        return np.sort(np.asarray(random.Random(key).sample(range(n), k), dtype=np.int64))
    setsize = 21  # CPython's choice of branch, word for word
    if k > 5:
        setsize += 4 ** math.ceil(math.log(k * 3, 4))
    chosen = _pool_branch(key, n, k) if n <= setsize else _set_branch(key, n, k)
    return np.sort(chosen).astype(np.int64)


def _pool_branch(key: str, n: int, k: int) -> np.ndarray:
    pool_array = np.arange(n, dtype=np.int32)
    pool = memoryview(pool_array)
    getrandbits = random.Random(key).getrandbits
    top, bits, stop = n, n.bit_length(), n - k
    while top > stop:
        low = max(stop + 1, 1 << (bits - 1))  # every m in [low, top] has this bit count
        for m in range(top, low - 1, -1):
            j = getrandbits(bits)
            while j >= m:
                j = getrandbits(bits)
            pool[m - 1], pool[j] = pool[j], pool[m - 1]
        top, bits = low - 1, bits - 1
    return pool_array[stop:]


def _set_branch(key: str, n: int, k: int) -> np.ndarray:
    bits = n.bit_length()
    outputs = generator(key)
    # draws expected: k x (2^bits / n) for the rejections below n, plus repeats (k < n / 3 in this branch)
    chunk = int(k * (1 << bits) / n * 1.6) + 64
    drawn = np.zeros(0, dtype=np.int64)
    while True:
        values = (outputs.random_raw(chunk) >> (32 - bits)).astype(np.int64)
        drawn = np.concatenate([drawn, values[values < n]])
        distinct, first = np.unique(drawn, return_index=True)
        if len(distinct) >= k:
            return distinct[np.argsort(first)[:k]]  # the first k distinct values drawn
        chunk *= 2


def float_chunks(key: str, count: int, chunk: int = 1 << 20):
    """The first `count` values of `random.Random(key).random()`, as float64 arrays of `chunk` (even, so that
    pairs of values stay in one array) values at a time, the last shorter: a few MB at a time, not 32 bytes
    a value at once."""
    if chunk < 2 or chunk % 2:
        raise ValueError(f"chunk must be even and >= 2, not {chunk}")
    outputs = generator(key)
    for done in range(0, count, chunk):
        raw = outputs.random_raw(2 * min(chunk, count - done))
        high, low = raw[0::2] >> np.uint64(5), raw[1::2] >> np.uint64(6)
        yield (high.astype(np.float64) * 67108864.0 + low.astype(np.float64)) * (1.0 / 9007199254740992.0)
