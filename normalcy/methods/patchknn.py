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
import torch

from normalcy.backbones import resolve_precision
from normalcy.methods.coreset import StreamingCoreset

# bfloat16 search: each patch's nearest bank patches by bfloat16 products, re-measured in
# float32. On Magnetic Tile features the true nearest was among the first 4 for every one of
# about 60,000 patches (224 and 448 px); 8 leaves a margin.
CANDIDATES = 8
FAISS_BATCH = 4096  # queries per faiss search call


class PatchKNN:
    """Memory bank + exact nearest-neighbour search (CPU: faiss in float32, or bfloat16
    candidates re-measured in float32).

    coreset_ratio: fraction of each image's patches kept on arrival (1.0 keeps all).
    max_bank_size: the bank is reduced to at most this many patches by a final greedy pass;
        it bounds the search cost per image (about 2 * patches * bank * dims flops).
    precision: "float32" searches with faiss; "bfloat16" picks candidates with bfloat16
        products and measures them in float32 (1.4x faster where the CPU has bfloat16
        instructions, same distances); "auto" decides for this CPU.
    """

    name = "patchknn"

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        max_bank_size: int = 10_000,
        projection_dim: int = 128,
        seed: int = 0,
        precision: str = "float32",
    ) -> None:
        resolve_precision(precision)
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.projection_dim = projection_dim
        self.seed = seed
        self.precision = precision

    def get_params(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "max_bank_size": self.max_bank_size,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
            "precision": self.precision,
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

    def _search_index(self) -> faiss.Index | tuple[torch.Tensor, torch.Tensor]:
        """faiss's exact index, or for bfloat16 search the bank and its bfloat16 (C + 1, N)
        form whose product with a query plus a trailing 1 is q.b - |b|^2 / 2, which ranks
        bank patches by distance to q."""
        if getattr(self, "_index", None) is None:
            if not hasattr(self, "memory_bank_"):
                raise RuntimeError("PatchKNN is not fitted: call fit() first")
            if resolve_precision(self.precision) == "bfloat16":
                bank = torch.from_numpy(self.memory_bank_)
                half_norms = -0.5 * (bank**2).sum(dim=1, keepdim=True)
                ranking = torch.cat([bank, half_norms], dim=1).to(torch.bfloat16).T.contiguous()
                self._index = (bank, ranking)
            else:
                self._index = faiss.IndexFlatL2(self.memory_bank_.shape[1])
                self._index.add(self.memory_bank_)
        return self._index

    def score(self, grid: np.ndarray) -> np.ndarray:
        """Distance of each patch of an (h, w, C) grid to its nearest normal patch: (h, w)."""
        index = self._search_index()
        dims = self.memory_bank_.shape[1]
        if grid.shape[-1] != dims:
            raise ValueError(f"features have {grid.shape[-1]} dims, the bank has {dims}")
        queries = np.ascontiguousarray(grid.reshape(-1, dims), dtype=np.float32)
        if isinstance(index, tuple):
            distances = _nearest_bfloat16(queries, *index)
        else:
            distances = np.empty(len(queries), dtype=np.float32)
            for start in range(0, len(queries), FAISS_BATCH):
                found, _ = index.search(queries[start : start + FAISS_BATCH], 1)
                distances[start : start + FAISS_BATCH] = found[:, 0]
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


def _nearest_bfloat16(
    queries: np.ndarray, bank: torch.Tensor, ranking: torch.Tensor, chunk: int = 256
) -> np.ndarray:
    """Squared float32 distance of each query to the nearest of its `CANDIDATES` best bank
    patches by bfloat16 ranking; chunked so each product stays in cache."""
    found = torch.empty(len(queries))
    candidates = min(CANDIDATES, len(bank))
    for start in range(0, len(queries), chunk):
        batch = torch.from_numpy(queries[start : start + chunk])
        ones = torch.ones(len(batch), 1)
        ranked = torch.cat([batch, ones], dim=1).to(torch.bfloat16) @ ranking
        nearest = ranked.topk(candidates, dim=1).indices
        found[start : start + chunk] = ((bank[nearest] - batch[:, None]) ** 2).sum(-1).amin(1)
    return found.numpy()
