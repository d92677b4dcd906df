"""From patch scores to what the user sees: maps at image size, image scores, thresholds."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, grey_closing

# Smoothing is specified at a 256-pixel scale and grows with the image (MVTec practice).
SIGMA_AT_256 = 4.0
TOP_FRACTION = 0.01


def anomaly_map(
    patch_scores: np.ndarray, size: tuple[int, int], sigma: float, dense: bool = False
) -> np.ndarray:
    """Patch scores (h, w) upsampled bilinearly to `size` (H, W) and Gaussian-smoothed.

    `sigma` is in pixels at a 256-pixel short side; it is scaled to the image.
    dense: the scores are a half-stride grid (`Backbone.features(dense=True)`), whose
    outer patch centres lie half a stride inside the image edges instead of tiling it.
    """
    grid = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[None, None]
    if dense:
        # The edge rows and columns extended to the image border, where the corners sit.
        grid = F.pad(grid, (1, 1, 1, 1), mode="replicate")
    full = F.interpolate(grid, size=size, mode="bilinear", align_corners=dense)[0, 0].numpy()
    if sigma > 0:
        full = gaussian_filter(full, sigma=sigma * min(size) / 256, mode="nearest", truncate=3.0)
    return full


def fill_gaps(patch_scores: np.ndarray, width: int) -> np.ndarray:
    """Grey-level closing over `width` x `width` patches (1: unchanged).

    A patch scored lower than patches on both sides of it within the window rises toward
    their level, so a broad defect whose inside looks normal patch by patch keeps its area
    instead of its outline alone; a peak keeps its height and extent, and no score falls.
    """
    if width < 1:
        raise ValueError(f"gap-filling width must be at least 1 patch, got {width}")
    if width == 1:
        return patch_scores
    return grey_closing(patch_scores, size=(width, width), mode="nearest")


def image_score(anomaly_map: np.ndarray, top_fraction: float = TOP_FRACTION) -> float:
    """Mean of the highest `top_fraction` of the map: robust to a single hot pixel, yet
    sensitive to small defects that a whole-image mean would dilute."""
    values = anomaly_map.ravel()
    k = max(1, int(round(values.size * top_fraction)))
    return float(np.partition(values, values.size - k)[-k:].mean())


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold that at most `fpr` of the normal scores exceed."""
    if not 0 <= fpr < 1:
        raise ValueError(f"target false-positive rate must be in [0, 1), got {fpr}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no normal scores to set a threshold from")
    allowed = int(np.floor(fpr * scores.size))
    return float(scores[scores.size - 1 - allowed])
