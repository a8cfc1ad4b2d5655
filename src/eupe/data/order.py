"""A seeded shuffle of [0, n) without a permutation in memory: a keyed Feistel network.

`Shuffle(n, key)(positions)` maps positions to items, vectorised, in O(1) memory. It is a bijection
on [0, n): a balanced Feistel network permutes [0, 4^h) (the smallest power of four >= n) and
"cycle-walking" re-applies it to any value that lands at or above n until it falls inside, which
keeps the bijection and costs under four applications on average. Any item's position in any epoch
is computable, so a loader's state is a step counter, and ranks that agree on (n, key) agree on the
whole global order whatever the world size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash (wrapping uint64 arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def round_keys(*seed: int) -> np.ndarray:
    """ROUNDS uint64 round keys from integers (e.g. run seed, stream, epoch)."""
    return np.random.SeedSequence([int(s) & 0xFFFFFFFF for s in seed]).generate_state(ROUNDS, np.uint64)


class Shuffle:
    """A keyed bijection on [0, n): `shuffle(positions) -> items` (any integer array)."""

    def __init__(self, n: int, keys: np.ndarray):
        if n <= 0:
            raise ValueError(f"Shuffle: n must be > 0; got {n}")
        self.n = int(n)
        self.keys = np.asarray(keys, dtype=np.uint64)
        half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)  # 4^half >= n
        self.half = np.uint64(half)
        self.mask = np.uint64((1 << half) - 1)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray | int) -> np.ndarray:
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.n):
            raise IndexError(f"Shuffle: positions must lie in [0, {self.n})")
        x = self._feistel(p.astype(np.uint64).reshape(-1))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle-walking: stays a bijection on [0, n)
            x[out] = self._feistel(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64).reshape(p.shape)


def epoch_order(positions: np.ndarray, n: int, keys: Callable[[int], np.ndarray]) -> np.ndarray:
    """Items at global `positions` of a stream of n items walked epoch after epoch, epoch e in the
    order `Shuffle(n, keys(e))` (positions may straddle an epoch boundary)."""
    epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), n)
    out = np.empty_like(offsets)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        out[at] = Shuffle(n, keys(int(epoch)))(offsets[at])
    return out
