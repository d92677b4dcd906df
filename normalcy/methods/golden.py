"""Golden templates: aligned parts scored against reference patches at the same place only.

For parts that sit on a fixture (printed boards, labels, machined parts), a patch should look
like the references' patches at its own position, not like any normal patch anywhere: a
solder pad where a trace belongs is normal somewhere on the board, but not there. Each test
patch is compared with the reference patches within `radius` grid cells of its position
(tolerating that much misalignment), and scores the distance to the nearest of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from normalcy.methods.base import FitSettings, GridScorer, GridScores, as_grid, fitted_array

MAX_RADIUS = 8  # cells of misalignment tolerated at most


class GoldenTemplate(GridScorer):
    """Position-restricted nearest neighbour over aligned reference grids (R, h, w, C)."""

    name = "golden"
    leaves_out = True

    def __init__(self, radius: int = 1) -> None:
        if not 0 <= radius <= MAX_RADIUS:
            raise ValueError(f"radius must be from 0 to {MAX_RADIUS} cells, got {radius}")
        self.radius = radius

    @classmethod
    def from_settings(cls, settings: FitSettings) -> GoldenTemplate:
        return cls()

    def get_params(self) -> dict[str, Any]:
        return {"radius": self.radius}

    def fit(self, grids: Iterable[np.ndarray | torch.Tensor]) -> GoldenTemplate:
        """Keep the references' grids; they must all have one shape (aligned, one size)."""
        references = [as_grid(grid).cpu() for grid in grids]
        if not references:
            raise ValueError("golden templates need at least one reference image")
        shapes = {tuple(r.shape) for r in references}
        if len(shapes) > 1:
            raise ValueError(
                f"golden templates need aligned references of one size; their feature grids "
                f"have shapes {sorted(shapes)}"
            )
        self.references_ = torch.stack(references).numpy()
        return self

    @property
    def n_features_in_(self) -> int:
        return int(self.references_.shape[-1])

    def score_grid(self, grid: torch.Tensor) -> GridScores:
        return GridScores(self._nearest(as_grid(grid), np.arange(len(self.references_))))

    def score_left_out(
        self, grids: Sequence[torch.Tensor], sources: Sequence[int], views: int = 1
    ) -> list[GridScores]:
        """Each reference scored against the others (the `sources[i]`-th is left out);
        references are never augmented, so each gave one grid (`views` must be 1)."""
        if views != 1:
            raise ValueError("golden references are not augmented: one view each")
        if len(self.references_) < 2:
            raise ValueError("one reference has nothing left to score it against")
        everyone = np.arange(len(self.references_))
        return [
            GridScores(self._nearest(as_grid(grid), everyone[everyone != source]))
            for grid, source in zip(grids, sources, strict=True)
        ]

    def _nearest(self, grid: torch.Tensor, chosen: np.ndarray) -> torch.Tensor:
        """(h, w) distance of each patch to the nearest patch of the `chosen` references
        within `radius` cells of its position."""
        references = torch.from_numpy(self.references_[chosen]).to(grid.device)
        return nearest_in_place(grid, references, self.radius)

    def export_module(self) -> GoldenModule:
        if not hasattr(self, "references_"):
            raise RuntimeError("GoldenTemplate is not fitted: call fit() first")
        return GoldenModule(self.references_, self.radius)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"references": self.references_}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> GoldenTemplate:
        method = cls(**params)
        method.references_ = fitted_array(arrays, "references", 4).astype(np.float32)
        return method


def nearest_in_place(grid: torch.Tensor, references: torch.Tensor, radius: int) -> torch.Tensor:
    """(h, w) distance of each patch of an (h, w, C) grid to the nearest patch of the
    (R, h, w, C) references within `radius` cells of its position."""
    if tuple(grid.shape) != tuple(references.shape[1:]):
        raise ValueError(
            f"the image's feature grid {tuple(grid.shape[:2])} does not match the "
            f"references' {tuple(references.shape[1:3])}: golden templates need images "
            "of the references' size, aligned"
        )
    height, width = grid.shape[:2]
    r = radius
    # References padded by r cells of +inf distance, then every shift within the radius.
    padded = torch.nn.functional.pad(
        references.permute(0, 3, 1, 2), (r, r, r, r), value=float("nan")
    ).permute(0, 2, 3, 1)
    best = torch.full((height, width), torch.inf, device=grid.device)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            shifted = padded[:, dy : dy + height, dx : dx + width]
            squared = ((shifted - grid[None]) ** 2).sum(-1).nan_to_num(nan=torch.inf)
            best = torch.minimum(best, squared.amin(0))
    return best.sqrt()


class GoldenModule(torch.nn.Module):
    """The references as a buffer and the position-restricted search (`export_module`)."""

    def __init__(self, references: np.ndarray, radius: int) -> None:
        super().__init__()
        self.register_buffer("references", torch.from_numpy(np.asarray(references)))
        self.radius = radius

    def forward(self, grid: torch.Tensor) -> GridScores:
        return GridScores(nearest_in_place(grid, self.references, self.radius))
