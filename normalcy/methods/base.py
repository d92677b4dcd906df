"""The one protocol every scoring method implements, so callers never ask what a method is.

A method turns feature grids (h, w, C) into `GridScores`: the patch scores its map is drawn
from, and what its image score comes from. Grids are torch tensors on the backbone's device
(numpy arrays are accepted too); scores stay on that device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class FitSettings:
    """What a detector's settings say about fitting a method; each method takes what it uses
    (`Method.from_settings`), so a detector never asks which method it holds."""

    few_shot: bool = False  # every reference kept (augmented), no sampling of the bank
    coreset_ratio: float = 0.1
    max_bank_size: int = 10_000
    seed: int = 0
    precision: str = "float32"
    low_variance_fraction: float | None = None
    context_half: bool = False  # the features' second half is the image-context half


@dataclass
class GridScores:
    """What a method says about one image's feature grid.

    patches: (h, w) scores the anomaly map is drawn from.
    ranking: (h, w) scores whose map's top ranks the image; None: `patches`.
    image: the method's own image score, where it has one (a 0-d tensor in exported graphs);
        None: the top of the ranking map.
    """

    patches: torch.Tensor
    ranking: torch.Tensor | None = None
    image: float | torch.Tensor | None = None


class Method(Protocol):
    """Fit on normal feature grids, score grids, save and restore the fitted arrays."""

    name: ClassVar[str]
    leaves_out: ClassVar[bool]
    """Whether `score_left_out` can score the images of the fit as if each were left out
    (then every normal image calibrates the threshold; else a held-out part does)."""

    @classmethod
    def from_settings(cls, settings: FitSettings) -> Method:
        """An unfitted method in a detector's settings."""
        ...

    def fit(self, grids: Iterable[torch.Tensor]) -> Method:
        """Learn from the feature grids of normal images (consumed once, in order)."""
        ...

    def score_batch(self, grids: Sequence[torch.Tensor]) -> list[GridScores]:
        """Scores of each grid of a batch (zero-shot methods score the batch against itself)."""
        ...

    def score_held_out(self, grids: Iterable[torch.Tensor]) -> list[GridScores]:
        """Scores of held-out normal images; a method that standardises its scores learns
        their scale from these first."""
        ...

    def score_left_out(
        self, grids: Sequence[torch.Tensor], sources: Sequence[int], views: int = 1
    ) -> list[GridScores]:
        """Scores of grids of the fit as if each one's image had been left out of it: the
        `sources[i]`-th image, which gave the fit `views` consecutive grids (its augmented
        views in few-shot mode); only where `leaves_out`."""
        ...

    def get_params(self) -> dict[str, Any]: ...

    @property
    def n_features_in_(self) -> int | None:
        """Feature dimensions a fitted method scores (None: any, as zero-shot scoring)."""
        ...

    def arrays(self) -> dict[str, np.ndarray]:
        """Fitted state to save."""
        ...

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Method: ...

    def export_module(self) -> torch.nn.Module:
        """The fitted method as tensor operations only, for export: a module mapping one
        (h, w, C) grid to `GridScores` whose fields are tensors (`image` a 0-d one), equal to
        `score_batch`'s. Raises `NotExportable`, saying why, where there is none."""
        ...


class NotExportable(ValueError):
    """A model that cannot become an exported graph; the message says why."""


class GridScorer:
    """Shared behaviour of methods that score each grid on its own (`score_grid`)."""

    leaves_out: ClassVar[bool] = False

    def score_grid(self, grid: torch.Tensor) -> GridScores:
        raise NotImplementedError

    def score_batch(self, grids: Sequence[torch.Tensor]) -> list[GridScores]:
        return [self.score_grid(grid) for grid in grids]

    def score_held_out(self, grids: Iterable[torch.Tensor]) -> list[GridScores]:
        return [self.score_grid(grid) for grid in grids]


def fitted_array(arrays: dict[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    """`arrays[key]`, checked to be a saved array of `ndim` dimensions with no empty one;
    a ValueError names what is wrong (the model loader adds the file)."""
    if key not in arrays:
        raise ValueError(f"array {key!r} is missing")
    array = np.asarray(arrays[key])
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(
            f"array {key!r} has shape {array.shape}; expected {ndim} non-empty dimensions"
        )
    return array


def exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype for sums and statistics that must not lose precision: float64 on the CPU;
    float32 on accelerators (MPS has no float64, GPUs run it slowly)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def as_grid(grid: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A feature grid as a float32 tensor (numpy arrays are wrapped without a copy)."""
    return torch.as_tensor(grid).float()
