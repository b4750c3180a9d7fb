"""The id index: the set of document ids a run has seen, in 16 bytes an id."""
from __future__ import annotations

import hashlib
from typing import List, Tuple

import numpy as np


def id_digest(doc_id: str) -> bytes:
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=16).digest()


def _key(doc_id: str) -> Tuple[int, int]:
    digest = id_digest(doc_id)
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


class IdIndex:
    """A set of document ids in 16 bytes each: 128-bit hashes as pairs of uint64 (every bit
    pattern kept, NUL bytes included), the recent ones in a Python set, the rest in sorted numpy
    runs merged like a binary counter (amortised O(log n) work per id, at most ~log2(n) runs to
    search)."""

    _RUN = 4096

    def __init__(self) -> None:
        self._runs: List[Tuple[np.ndarray, np.ndarray]] = []  # (high, low) halves, sorted
        self._recent: set = set()

    def __len__(self) -> int:
        return sum(len(high) for high, _ in self._runs) + len(self._recent)

    def _has(self, key: Tuple[int, int]) -> bool:
        if key in self._recent:
            return True
        if not self._runs:
            return False
        high, low = np.uint64(key[0]), key[1]
        for highs, lows in self._runs:
            i = highs.searchsorted(high)
            while i < len(highs) and highs[i] == high:  # 64-bit halves rarely repeat
                if int(lows[i]) == low:
                    return True
                i += 1
        return False

    def __contains__(self, doc_id: str) -> bool:
        return self._has(_key(doc_id))

    def add(self, doc_id: str) -> bool:
        """Add ``doc_id``; False if it was already there."""
        key = _key(doc_id)
        if self._has(key):
            return False
        self._recent.add(key)
        if len(self._recent) >= self._RUN:
            pairs = np.array(sorted(self._recent), dtype=np.uint64)
            self._runs.append((pairs[:, 0].copy(), pairs[:, 1].copy()))
            self._recent = set()
            while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
                high2, low2 = self._runs.pop()
                high1, low1 = self._runs[-1]
                high, low = np.concatenate([high1, high2]), np.concatenate([low1, low2])
                order = np.lexsort((low, high))
                self._runs[-1] = (high[order], low[order])
        return True

