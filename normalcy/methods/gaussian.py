"""A multivariate Gaussian of normal features, scored by Mahalanobis distance (Rippel et al.).

Two Gaussians are fitted from the same feature grids: one of whole-image features (the grid's
mean over positions) for the image score, one of single patches for the anomaly map. Both use
Ledoit-Wolf shrinkage, so the covariance stays invertible with fewer images than dimensions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from normalcy.methods.base import (
    FitSettings,
    GridScorer,
    GridScores,
    as_grid,
    exact_dtype,
    fitted_array,
)


class Moments:
    """Running sums from which the mean and the Ledoit-Wolf covariance follow exactly.

    The centred fourth moments that Ledoit-Wolf needs are expanded into raw sums, so the
    samples are seen once and never stored.
    """

    def __init__(self, dims: int) -> None:
        self.n = 0
        self.sum = np.zeros(dims)
        self.outer = np.zeros((dims, dims))
        self.sq_norm = 0.0  # sum of |x|^2
        self.sq_norm_sq = 0.0  # sum of |x|^4
        self.sq_norm_x = np.zeros(dims)  # sum of |x|^2 x

    def add(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, dtype=np.float64).reshape(-1, self.sum.size)
        norms = np.einsum("ij,ij->i", x, x)
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        self.sq_norm += norms.sum()
        self.sq_norm_sq += (norms**2).sum()
        self.sq_norm_x += norms @ x

    def merge(self, other: Moments) -> None:
        """Add the sums of other samples (kept elsewhere, e.g. on another machine)."""
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        self.sq_norm += other.sq_norm
        self.sq_norm_sq += other.sq_norm_sq
        self.sq_norm_x += other.sq_norm_x

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Mean, Ledoit-Wolf shrunk covariance and the shrinkage used (0 = none, 1 = all)."""
        if self.n < 2:
            raise ValueError(f"a Gaussian needs at least 2 samples, got {self.n}")
        n, p = self.n, self.sum.size
        mean = self.sum / n
        cov = self.outer / n - np.outer(mean, mean)
        m2 = mean @ mean
        # sum over samples of |x - mean|^4, from the raw sums
        fourth = (
            self.sq_norm_sq
            + 4 * mean @ self.outer @ mean
            + n * m2**2
            - 4 * mean @ self.sq_norm_x
            + 2 * m2 * self.sq_norm
            - 4 * m2 * (mean @ self.sum)
        )
        scale = np.trace(cov) / p
        target_gap = ((cov - scale * np.eye(p)) ** 2).sum() / p
        spread = max(fourth / n - (cov**2).sum(), 0.0) / (n * p)
        shrinkage = 0.0 if target_gap == 0 else min(spread, target_gap) / target_gap
        shrunk = (1 - shrinkage) * cov + shrinkage * scale * np.eye(p)
        return mean, shrunk, float(shrinkage)


class FeatureSums:
    """Running sums of single patches and of whole-image mean features, grid by grid."""

    def __init__(self) -> None:
        self.patches: Moments | None = None
        self.images: Moments | None = None

    def add(self, grid: np.ndarray | torch.Tensor) -> None:
        flat = as_grid(grid).reshape(-1, grid.shape[-1]).cpu().numpy()
        if self.patches is None or self.images is None:
            self.patches, self.images = Moments(flat.shape[1]), Moments(flat.shape[1])
        self.patches.add(flat)
        self.images.add(flat.mean(axis=0))

    def merge(self, other: FeatureSums) -> None:
        """Add sums gathered from other images: the same sums as if this had seen them."""
        if other.patches is None or other.images is None:
            return
        if self.patches is None or self.images is None:  # own arrays: others may be read-only
            dims = other.patches.sum.size
            self.patches, self.images = Moments(dims), Moments(dims)
        self.patches.merge(other.patches)
        self.images.merge(other.images)


def whitening(cov: np.ndarray, low_variance_fraction: float | None) -> np.ndarray:
    """A (dims, k) matrix W with |W^T (x - mean)| the Mahalanobis distance.

    With `low_variance_fraction` (in (0, 1], as `GaussianScorer` checks), only the
    smallest-variance principal components that together hold that fraction of the variance
    are kept: Rippel et al. find anomalies live there.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-12)
    if low_variance_fraction is not None:
        share = np.cumsum(eigenvalues) / eigenvalues.sum()  # ascending eigenvalues
        keep = max(1, int(np.searchsorted(share, low_variance_fraction, side="right")))
        eigenvalues, eigenvectors = eigenvalues[:keep], eigenvectors[:, :keep]
    return eigenvectors / np.sqrt(eigenvalues)


class GaussianScorer(GridScorer):
    """Mahalanobis distance to Gaussians of normal image features and normal patch features.

    low_variance_fraction: keep only the principal components of smallest variance that hold
        this share of the variance (None keeps all).
    """

    name = "gaussian"

    def __init__(self, low_variance_fraction: float | None = None) -> None:
        if low_variance_fraction is not None and not 0 < low_variance_fraction <= 1:
            raise ValueError(
                f"low_variance_fraction must be in (0, 1], got {low_variance_fraction}"
            )
        self.low_variance_fraction = low_variance_fraction

    @classmethod
    def from_settings(cls, settings: FitSettings) -> GaussianScorer:
        return cls(low_variance_fraction=settings.low_variance_fraction)

    def get_params(self) -> dict[str, Any]:
        return {"low_variance_fraction": self.low_variance_fraction}

    def fit(self, features: Iterable[np.ndarray | torch.Tensor]) -> GaussianScorer:
        """Fit both Gaussians from per-image feature grids (h, w, C)."""
        sums = FeatureSums()
        for grid in features:
            sums.add(grid)
        return self.fit_sums(sums)

    def fit_sums(self, sums: FeatureSums) -> GaussianScorer:
        """Fit both Gaussians from sums gathered elsewhere (one pass shared with another
        method)."""
        if sums.images is None or sums.images.n < 2:
            raise ValueError("the gaussian method needs at least 2 normal images")
        self.image_mean_, image_cov, self.image_shrinkage_ = sums.images.mean_and_covariance()
        self.patch_mean_, patch_cov, self.patch_shrinkage_ = sums.patches.mean_and_covariance()
        self.image_whitening_ = whitening(image_cov, self.low_variance_fraction)
        self.patch_whitening_ = whitening(patch_cov, self.low_variance_fraction)
        self._tensors = {}
        return self

    def _check_fitted(self, grid: torch.Tensor) -> None:
        if not hasattr(self, "patch_mean_"):
            raise RuntimeError("GaussianScorer is not fitted: call fit() first")
        if grid.shape[-1] != self.patch_mean_.size:
            raise ValueError(
                f"features have {grid.shape[-1]} dims, the model has {self.patch_mean_.size}"
            )

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The fitted arrays as tensors on `device`, in `exact_dtype` (float64 on the CPU, as
        fitted)."""
        self._tensors = getattr(self, "_tensors", {})
        if str(device) not in self._tensors:
            self._tensors[str(device)] = {
                key: torch.from_numpy(np.asarray(value)).to(device, exact_dtype(device))
                for key, value in self.arrays().items()
            }
        return self._tensors[str(device)]

    def score(self, grid: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each patch of an (h, w, C) grid: (h, w)."""
        grid = as_grid(grid)
        self._check_fitted(grid)
        return _patch_distances(grid, self._on(grid.device))

    def image_score(self, grid: np.ndarray | torch.Tensor) -> float:
        """Mahalanobis distance of the image's mean feature."""
        grid = as_grid(grid)
        self._check_fitted(grid)
        return float(_image_distance(grid, self._on(grid.device)))

    def score_grid(self, grid: torch.Tensor) -> GridScores:
        """The patch map, and the image score from the Gaussian of whole-image features."""
        return GridScores(self.score(grid), image=self.image_score(grid))

    def export_module(self) -> MahalanobisModule:
        if not hasattr(self, "patch_mean_"):
            raise RuntimeError("GaussianScorer is not fitted: call fit() first")
        return MahalanobisModule(self.arrays())

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "image_mean": self.image_mean_,
            "image_whitening": self.image_whitening_,
            "patch_mean": self.patch_mean_,
            "patch_whitening": self.patch_whitening_,
        }

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> GaussianScorer:
        method = cls(**params)
        for part in ("image", "patch"):
            mean = fitted_array(arrays, f"{part}_mean", 1)
            whitening = fitted_array(arrays, f"{part}_whitening", 2)
            if whitening.shape[0] != mean.shape[0]:
                raise ValueError(
                    f"array '{part}_whitening' has {whitening.shape[0]} rows for "
                    f"{mean.shape[0]}-dim features"
                )
            setattr(method, f"{part}_mean_", mean.astype(np.float64))
            setattr(method, f"{part}_whitening_", whitening.astype(np.float64))
        method._tensors = {}
        return method

    @property
    def n_features_in_(self) -> int:
        """Feature dimensions the fitted Gaussian expects."""
        return int(self.patch_mean_.shape[0])


def _patch_distances(grid: torch.Tensor, fitted: dict[str, torch.Tensor]) -> torch.Tensor:
    """(h, w) float32 Mahalanobis distances of an (h, w, C) grid's patches, computed in the
    dtype of the `fitted` arrays."""
    flat = grid.reshape(-1, grid.shape[-1]).to(fitted["patch_mean"].dtype)
    distances = torch.linalg.vector_norm(
        (flat - fitted["patch_mean"]) @ fitted["patch_whitening"], dim=1
    )
    return distances.reshape(grid.shape[:-1]).float()


def _image_distance(grid: torch.Tensor, fitted: dict[str, torch.Tensor]) -> torch.Tensor:
    """0-d Mahalanobis distance of the grid's mean feature to the Gaussian of images'."""
    pooled = grid.reshape(-1, grid.shape[-1]).to(fitted["image_mean"].dtype).mean(dim=0)
    return torch.linalg.vector_norm((pooled - fitted["image_mean"]) @ fitted["image_whitening"])


class MahalanobisModule(torch.nn.Module):
    """The fitted Gaussians as buffers, in float64 as the library computes (`export_module`)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        super().__init__()
        for key, value in arrays.items():
            self.register_buffer(key, torch.from_numpy(np.asarray(value, dtype=np.float64)))

    def forward(self, grid: torch.Tensor) -> GridScores:
        fitted = dict(self.named_buffers())
        return GridScores(
            _patch_distances(grid, fitted), image=_image_distance(grid, fitted).float()
        )
