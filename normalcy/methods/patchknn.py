"""Patch nearest-neighbour scoring against a memory bank of normal patches.

PatchCore in full-shot (the bank is a greedy coreset of all normal patches) and AnomalyDINO in
few-shot (the bank holds every patch of a few augmented references). A patch's anomaly score
is its distance to the nearest normal patch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import faiss
import numpy as np

from normalcy.methods.coreset import StreamingCoreset


class PatchKNN:
    """Memory bank + exact nearest-neighbour search (faiss, CPU).

    coreset_ratio: fraction of each image's patches kept on arrival (1.0 keeps all).
    max_bank_size: the bank is reduced to at most this many patches by a final greedy pass;
        it bounds the search cost per image (about 2 * patches * bank * dims flops).
    """

    name = "patchknn"

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        max_bank_size: int = 10_000,
        projection_dim: int = 128,
        seed: int = 0,
    ) -> None:
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.projection_dim = projection_dim
        self.seed = seed

    def get_params(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "max_bank_size": self.max_bank_size,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
        }

    def fit(self, features: Iterable[np.ndarray]) -> PatchKNN:
        """Build the bank from per-image feature grids (h, w, C) or patch lists (N, C)."""
        coreset = StreamingCoreset(
            self.coreset_ratio, self.max_bank_size, self.projection_dim, self.seed
        )
        for grid in features:
            coreset.add(grid.reshape(-1, grid.shape[-1]))
        self.memory_bank_ = coreset.finish()
        self.n_patches_seen_ = coreset.n_seen
        self._index = None
        return self

    def _search_index(self) -> faiss.Index:
        if getattr(self, "_index", None) is None:
            if not hasattr(self, "memory_bank_"):
                raise RuntimeError("PatchKNN is not fitted: call fit() first")
            self._index = faiss.IndexFlatL2(self.memory_bank_.shape[1])
            self._index.add(self.memory_bank_)
        return self._index

    def score(self, grid: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Distance of each patch of an (h, w, C) grid to its nearest normal patch: (h, w)."""
        index = self._search_index()
        if grid.shape[-1] != index.d:
            raise ValueError(f"features have {grid.shape[-1]} dims, the bank has {index.d}")
        queries = np.ascontiguousarray(grid.reshape(-1, grid.shape[-1]), dtype=np.float32)
        distances = np.empty(len(queries), dtype=np.float32)
        for start in range(0, len(queries), batch_size):
            found, _ = index.search(queries[start : start + batch_size], 1)
            distances[start : start + batch_size] = found[:, 0]
        return np.sqrt(np.maximum(distances, 0)).reshape(grid.shape[:-1])

    def arrays(self) -> dict[str, np.ndarray]:
        """Fitted state to save."""
        return {"memory_bank": self.memory_bank_}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> PatchKNN:
        method = cls(**params)
        method.memory_bank_ = np.ascontiguousarray(arrays["memory_bank"], dtype=np.float32)
        method.n_patches_seen_ = None
        method._index = None
        return method
