"""Greedy k-center coreset: a small subset of patch features that covers all of them.

Selecting the point farthest from those already chosen keeps rare normal patterns that random
subsampling would drop. Distances are computed on a random projection (Johnson-Lindenstrauss)
for speed; the selection is then applied to the full features.
"""

from __future__ import annotations

import numpy as np

# Rows one greedy pass over a chunk covers at most: a larger chunk (a large image's grid) is
# reduced in consecutive parts of about this size, each a composable coreset of its own, so
# the distances each step reads stay in cache (25,600 rows at 128 dims: 4x faster in parts).
PART_ROWS = 8192
# The final greedy pass reads all kept rows at each of its `max_size` steps. Where more than
# this many times `max_size` rows are kept (a fit of large grids, or few-shot references that
# keep every patch), they are first reduced in parts to that many, the same way as chunks.
FINISH_FACTOR = 4


def random_projection(dim: int, projection_dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim, projection_dim)) / projection_dim**0.5).astype(np.float32)


def greedy_coreset(
    features: np.ndarray, n_select: int, projection_dim: int = 128, seed: int = 0
) -> np.ndarray:
    """Indices of `n_select` rows of `features` (N, D) chosen by greedy k-center selection."""
    n = len(features)
    if n_select >= n:
        return np.arange(n)
    if n_select < 1:
        raise ValueError(f"n_select must be at least 1, got {n_select}")
    points = np.ascontiguousarray(features, dtype=np.float32)
    if projection_dim and projection_dim < points.shape[1]:
        points = points @ random_projection(points.shape[1], projection_dim, seed)
    squared_norms = np.einsum("ij,ij->i", points, points)
    selected = np.empty(n_select, dtype=np.int64)
    selected[0] = np.random.default_rng(seed).integers(n)
    nearest = np.full(n, np.inf, dtype=np.float32)
    for i in range(n_select):
        if i:
            selected[i] = nearest.argmax()
        index = selected[i]
        # Squared distances to the newest centre, updated in place to avoid temporaries.
        distance = points @ points[index]
        distance *= -2
        distance += squared_norms
        distance += squared_norms[index]
        np.minimum(nearest, distance, out=nearest)
        nearest[index] = -np.inf  # never chosen twice, even among duplicate rows
    return selected


class StreamingCoreset:
    """Bounded-memory coreset over a stream of feature chunks.

    Each chunk is reduced on arrival to `ratio` of its rows (a composable coreset), so only
    the reduced rows are kept; `finish` runs one more greedy pass down to `max_size` rows
    (after a reduction in parts where far more are kept: `FINISH_FACTOR`).
    `sources_` then says which chunk (by arrival order) each row of the coreset came from.
    """

    def __init__(self, ratio: float, max_size: int, projection_dim: int = 128, seed: int = 0):
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        if max_size < 1:
            raise ValueError(f"max bank size must be at least 1, got {max_size}")
        self.ratio = ratio
        self.max_size = max_size
        self.projection_dim = projection_dim
        self.seed = seed
        self._kept: list[np.ndarray] = []
        self._sources: list[np.ndarray] = []
        self.n_seen = 0

    def reduce(self, chunk: np.ndarray, key: int) -> np.ndarray:
        """The rows of one (N, D) chunk that it keeps: a pure function of the chunk and its
        `key` (the seed offset, its arrival number), so chunks may be reduced anywhere, e.g.
        on other machines, and `keep` in order."""
        kept = self._in_parts(chunk, self.ratio, self.seed + key)
        return np.ascontiguousarray(chunk[kept], dtype=np.float32)

    def _in_parts(self, rows: np.ndarray, ratio: float, seed: int) -> np.ndarray:
        """Sorted indices of `ratio` of `rows`, chosen greedily in consecutive parts of about
        `PART_ROWS` rows (each a composable coreset of its own)."""
        found, start = [], 0
        for part in np.array_split(rows, max(1, -(-len(rows) // PART_ROWS))):
            n_keep = max(1, round(len(part) * ratio))
            found.append(start + np.sort(greedy_coreset(part, n_keep, self.projection_dim, seed)))
            start += len(part)
        return np.concatenate(found)

    def keep(self, rows: np.ndarray, n_seen: int) -> None:
        """Keep the reduced rows of the next chunk, which had `n_seen` rows."""
        self._kept.append(rows)
        self._sources.append(np.full(len(rows), len(self._sources), dtype=np.int64))
        self.n_seen += n_seen

    def add(self, chunk: np.ndarray) -> None:
        """Reduce one (N, D) chunk and keep the result."""
        self.keep(self.reduce(chunk, len(self._kept)), len(chunk))

    def finish(self) -> np.ndarray:
        """The final (M, D) coreset, M <= max_size."""
        if not self._kept:
            raise ValueError("no features were added to the coreset")
        kept, sources = np.concatenate(self._kept), np.concatenate(self._sources)
        self._kept, self._sources = [], []
        if len(kept) <= self.max_size:
            self.sources_ = sources
            return kept
        if len(kept) > FINISH_FACTOR * self.max_size:
            first = self._in_parts(kept, FINISH_FACTOR * self.max_size / len(kept), self.seed)
            kept, sources = kept[first], sources[first]
        indices = np.sort(greedy_coreset(kept, self.max_size, self.projection_dim, self.seed))
        self.sources_ = sources[indices]
        return kept[indices]
