"""Patch nearest-neighbour scoring against a memory bank of normal patches.

PatchCore in full-shot (the bank is a greedy coreset of all normal patches) and AnomalyDINO in
few-shot (the bank holds every patch of a few augmented references). A patch's anomaly score
is its distance to the nearest normal patch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from normalcy.backbones import resolve_precision
from normalcy.methods.base import FitSettings, GridScorer, GridScores, as_grid, fitted_array
from normalcy.methods.coreset import StreamingCoreset

# bfloat16 search: each patch's nearest bank patches by bfloat16 products, re-measured in
# float32. On Magnetic Tile features the true nearest was among the first 4 for every one of
# about 60,000 patches (224 and 448 px); 8 leaves a margin.
CANDIDATES = 8
# Queries per matrix-product block: on a CPU, few enough that a block's products (512 x a
# 10,000-patch bank: 20 MB) are reduced while still in cache; on an accelerator, many.
CPU_CHUNK = 512
DEVICE_CHUNK = 8192
BLOCK = 128  # bank patches per block of the nearest one's two-step search


def knn_params(settings: FitSettings) -> dict[str, Any]:
    """A memory bank's parameters in a detector's settings: few-shot keeps every patch of the
    references (up to the bank's size)."""
    return {
        "coreset_ratio": 1.0 if settings.few_shot else settings.coreset_ratio,
        "max_bank_size": settings.max_bank_size,
        "seed": settings.seed,
        "precision": settings.precision,
    }


class PatchKNN(GridScorer):
    """Memory bank + exact nearest-neighbour search, on the device the features are on.

    coreset_ratio: fraction of each image's patches kept on arrival (1.0 keeps all).
    max_bank_size: the bank is reduced to at most this many patches by a final greedy pass;
        it bounds the search cost per image (about 2 * patches * bank * dims flops).
    precision: "float32" searches exactly, by float32 matrix products;
        "bfloat16" picks candidates with bfloat16 products and measures them in float32
        (1.4x faster where the CPU has bfloat16 instructions, same distances); "auto"
        decides for the device.
    """

    name = "patchknn"
    leaves_out = True

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

    @classmethod
    def from_settings(cls, settings: FitSettings) -> PatchKNN:
        return cls(**knn_params(settings))

    def get_params(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "max_bank_size": self.max_bank_size,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
            "precision": self.precision,
        }

    def _coreset(self) -> StreamingCoreset:
        return StreamingCoreset(
            self.coreset_ratio, self.max_bank_size, self.projection_dim, self.seed
        )

    def fit(self, features: Iterable[np.ndarray | torch.Tensor]) -> PatchKNN:
        """Build the bank from per-image feature grids (h, w, C) or patch lists (N, C); each
        is reduced on arrival, so only the bank's share of them is ever held."""
        return self.fit_reduced(self.reduce(features))

    def reduce(
        self, features: Iterable[np.ndarray | torch.Tensor], first: int = 0
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Each image's share of the bank and its patch count, for images numbered from
        `first` in the order of the fit: a fit may be split into parts reduced apart (on
        other machines) and joined in order by `fit_reduced`, giving the same bank."""
        coreset = self._coreset()
        for key, grid in enumerate(features, first):
            patches = as_grid(grid).reshape(-1, grid.shape[-1]).cpu().numpy()
            yield coreset.reduce(patches, key), len(patches)

    def fit_reduced(self, reduced: Iterable[tuple[np.ndarray, int]]) -> PatchKNN:
        """Build the bank from `reduce`'s output, in the order of the fit."""
        coreset = self._coreset()
        for rows, n_seen in reduced:
            coreset.keep(rows, n_seen)
        self.memory_bank_ = coreset.finish()
        self.bank_sources_ = coreset.sources_  # not saved: only calibration needs it
        self.n_patches_seen_ = coreset.n_seen
        self._indexes: dict[str, Any] = {}
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            raise RuntimeError("PatchKNN is not fitted: call fit() first")

    def _index(self, device: torch.device) -> Any:
        """The search structure for `device`, made once: the bank on the device and its
        (C + 1, N) ranking form in the search's dtype, whose product with a query plus a
        trailing 1 is q.b - |b|^2 / 2, which ranks bank patches by distance to q."""
        self._check_fitted()
        self._indexes = getattr(self, "_indexes", {})
        key = str(device)
        if key not in self._indexes:
            precision = resolve_precision(self.precision, device)
            bank = torch.from_numpy(self.memory_bank_).to(device)
            dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
            self._indexes[key] = (bank, _ranking(bank).to(dtype).contiguous())
        return self._indexes[key]

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Distance of each of (N, C) queries to its nearest bank patch: (N,), same device."""
        bank, ranking = self._index(queries.device)  # refuses an unfitted method first
        dims = bank.shape[1]
        if queries.shape[-1] != dims:
            raise ValueError(f"features have {queries.shape[-1]} dims, the bank has {dims}")
        if ranking.dtype == torch.bfloat16:
            distances = _nearest_reranked(queries, bank, ranking)
        else:
            distances = _nearest_exact(queries, bank, ranking)
        return distances.sqrt_()

    def score(self, grid: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Distance of each patch of an (h, w, C) grid to its nearest normal patch: (h, w)."""
        grid = as_grid(grid)
        return self.nearest(grid.reshape(-1, grid.shape[-1])).reshape(grid.shape[:-1])

    def score_grid(self, grid: torch.Tensor) -> GridScores:
        return GridScores(self.score(grid))

    def score_left_out(
        self, grids: Sequence[torch.Tensor], sources: Sequence[int], views: int = 1
    ) -> list[GridScores]:
        """Scores of grids of the images the bank was fitted from, each (of the
        `sources[i]`-th image, which gave `views` consecutive grids) searched against the
        bank without the patches its image gave it: as if the image had been left out
        (slightly above that, if anything, since the bank kept fewer patches of similar
        images because of it)."""
        if getattr(self, "bank_sources_", None) is None:
            raise RuntimeError("left-out scores need the fit itself, not a loaded bank")
        results = []
        bank = ranking = None
        for grid, source in zip(grids, sources, strict=True):
            grid = as_grid(grid)
            if bank is None:  # exact float32 search whatever the predict precision
                bank = torch.from_numpy(self.memory_bank_).to(grid.device)
                ranking = _ranking(bank)
            excluded = np.flatnonzero(self.bank_sources_ // views == source)
            if len(excluded) == len(self.memory_bank_):
                raise ValueError("a bank made of one image has nothing left to score it against")
            queries = grid.reshape(-1, grid.shape[-1])
            dropped = torch.from_numpy(excluded).to(grid.device)
            distances = _nearest_exact(queries, bank, ranking, dropped=dropped)
            results.append(GridScores(distances.sqrt_().reshape(grid.shape[:-1])))
        return results

    def score_batch(self, grids: Sequence[torch.Tensor]) -> list[GridScores]:
        """All patches of the batch searched together (one large product on a device)."""
        if not grids:
            return []
        grids = [as_grid(g) for g in grids]
        flat = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids])
        distances = self.nearest(flat).split([g.shape[0] * g.shape[1] for g in grids])
        return [GridScores(d.reshape(g.shape[:-1])) for d, g in zip(distances, grids, strict=True)]

    def arrays(self) -> dict[str, np.ndarray]:
        """Fitted state to save."""
        return {"memory_bank": self.memory_bank_}

    @property
    def n_features_in_(self) -> int:
        """Feature dimensions of the memory bank, which scored grids must have."""
        return int(self.memory_bank_.shape[1])

    def export_module(self) -> NearestPatchModule:
        self._check_fitted()
        return NearestPatchModule(self.memory_bank_)

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> PatchKNN:
        method = cls(**params)
        bank = fitted_array(arrays, "memory_bank", 2)
        method.memory_bank_ = np.ascontiguousarray(bank, dtype=np.float32)
        method.bank_sources_ = None
        method.n_patches_seen_ = None
        method._indexes = {}
        return method


def _ranking(bank: torch.Tensor) -> torch.Tensor:
    """(C + 1, M') matrix whose product with [query, 1] ranks bank patches by nearness:
    q.b - |b|^2 / 2 grows as |q - b| shrinks. Its columns are padded to a multiple of
    `BLOCK` with columns that rank below any bank patch (-1e30), so the ranks can be
    reduced in blocks."""
    ranking = torch.cat([bank, -0.5 * (bank**2).sum(dim=1, keepdim=True)], dim=1)
    padding = torch.zeros((-len(bank)) % BLOCK, ranking.shape[1], device=bank.device)
    padding[:, -1] = -1e30
    return torch.cat([ranking, padding]).T


def _chunk(device: torch.device, chunk: int | None) -> int:
    """Queries per product block: `chunk` where given, else the device's."""
    return chunk or (CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK)


def _nearest_reranked(
    queries: torch.Tensor, bank: torch.Tensor, ranking: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Squared float32 distance of each query to the nearest of its `CANDIDATES` best bank
    patches by products with `ranking` in its dtype (bfloat16: fast, approximate), the
    candidates re-measured by differences."""
    found = torch.empty(len(queries), device=queries.device)
    candidates = min(CANDIDATES, len(bank))
    chunk = _chunk(queries.device, chunk)
    for start in range(0, len(queries), chunk):
        batch = queries[start : start + chunk]
        ones = torch.ones(len(batch), 1, device=batch.device)
        ranked = torch.cat([batch, ones], dim=1).to(ranking.dtype) @ ranking
        nearest = ranked.topk(candidates, dim=1).indices
        found[start : start + chunk] = ((bank[nearest] - batch[:, None]) ** 2).sum(-1).amin(1)
    return found


def _nearest_exact(
    queries: torch.Tensor,
    bank: torch.Tensor,
    ranking: torch.Tensor,
    chunk: int | None = None,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared distance of each query to its nearest bank patch (bank patches at `dropped`
    never count), in blocks of `chunk` queries (see `_squared_nearest`)."""
    found = torch.empty(len(queries), device=queries.device)
    chunk = _chunk(queries.device, chunk)
    for start in range(0, len(queries), chunk):
        found[start : start + chunk] = _squared_nearest(
            queries[start : start + chunk], bank, ranking, dropped
        )
    return found


def _squared_nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    ranking: torch.Tensor,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query's squared distance to its nearest bank patch not at `dropped`: found by one
    float32 product with the `_ranking` matrix, then measured by differences, since
    |q|^2 - 2 q.b + |b|^2 loses the small distances (a patch to itself) to rounding."""
    ranked = torch.cat([queries, torch.ones_like(queries[:, :1])], dim=1) @ ranking
    if dropped is not None:
        ranked.index_fill_(1, dropped, -torch.inf)
    nearest = bank[_block_argmax(ranked)]
    return ((nearest - queries) ** 2).sum(dim=1)


def _block_argmax(ranked: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over columns in `BLOCK`s: the best block by its maximum, then the
    best column in it (on a CPU 2.5x faster than one argmax over the row)."""
    blocks = ranked.unflatten(1, (-1, BLOCK))
    best = blocks.amax(dim=2).argmax(dim=1)
    inside = torch.gather(blocks, 1, best[:, None, None].expand(-1, 1, BLOCK)).squeeze(1)
    return best * BLOCK + inside.argmax(dim=1)


class NearestPatchModule(torch.nn.Module):
    """Patch kNN as one matrix product with the bank's ranking matrix (`export_module`)."""

    def __init__(self, bank: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("ranking", _ranking(torch.from_numpy(bank)).contiguous())

    def forward(self, grid: torch.Tensor) -> GridScores:
        queries = grid.reshape(-1, grid.shape[-1])
        bank = self.ranking[:-1].T  # the bank is the ranking's first rows (and padding)
        distances = _squared_nearest(queries, bank, self.ranking).sqrt()
        return GridScores(distances.reshape(grid.shape[:-1]))
