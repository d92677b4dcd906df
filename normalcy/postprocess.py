"""From patch scores to what the user sees: maps, image scores, thresholds.

Every map is first drawn at a fixed scale of the patch grid (`MAP_PIXELS_PER_PATCH` pixels per
backbone patch), where image scores and thresholds are computed; only a caller who asks for a
map at image size pays for `resize_map`. So a 5-megapixel photo costs what its backbone input
costs, and its score does not depend on its pixel count. All numerics run in torch on the
scores' device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Smoothing is specified at a 256-pixel short side and scales with the map (MVTec practice).
SIGMA_AT_256 = 4.0
TOP_FRACTION = 0.01
# The scale of every map before it is resized to an image: 8 pixels per backbone patch keeps
# bilinear upsampling and the top 1% as they are at image size (a 224 px input gives a
# 128-pixel short side) at a cost independent of the image.
MAP_PIXELS_PER_PATCH = 8
GAUSSIAN_TRUNCATE = 3.0  # kernel radius in sigmas


def _as_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values).float()


def gaussian_smooth(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(H, W) smoothed by a separable Gaussian of `sigma` pixels, edges extended (the
    "nearest" mode of scipy.ndimage.gaussian_filter, same kernel and truncation)."""
    if sigma <= 0:
        return image
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.device, image.dtype)
    x = F.pad(image[None, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return F.conv2d(x, kernel.view(1, 1, 1, -1))[0, 0]


UPSAMPLING = ("bilinear", "bicubic")


def anomaly_map(
    patch_scores: np.ndarray | torch.Tensor,
    size: tuple[int, int],
    sigma: float,
    dense: bool = False,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Patch scores (h, w) upsampled to `size` (H, W) and Gaussian-smoothed.

    `sigma` is in pixels at a 256-pixel short side; it is scaled to `size`.
    dense: the scores are a half-stride grid (`Backbone.features(dense=True)`), whose
    outer patch centres lie half a stride inside the image edges instead of tiling it.
    mode: "bilinear" or "bicubic" (sharper peaks between patch centres, for small defects).
    """
    if mode not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {mode!r}")
    grid = _as_tensor(patch_scores)[None, None]
    if dense:
        # The edge rows and columns extended to the image border, where the corners sit.
        grid = F.pad(grid, (1, 1, 1, 1), mode="replicate")
    full = F.interpolate(grid, size=tuple(size), mode=mode, align_corners=dense)[0, 0]
    return gaussian_smooth(full, sigma * min(size) / 256)


def plain_grid_size(shape: tuple[int, int], dense: bool) -> tuple[int, int]:
    """Rows and columns of the plain-stride grid behind a grid of `shape`."""
    return ((shape[0] + 1) // 2, (shape[1] + 1) // 2) if dense else (shape[0], shape[1])


def score_map(
    patch_scores: np.ndarray | torch.Tensor,
    sigma: float,
    dense: bool = False,
    mode: str = "bilinear",
) -> torch.Tensor:
    """The anomaly map at the fixed scale: `MAP_PIXELS_PER_PATCH` pixels per plain patch."""
    rows, cols = plain_grid_size(tuple(patch_scores.shape), dense)
    size = (rows * MAP_PIXELS_PER_PATCH, cols * MAP_PIXELS_PER_PATCH)
    return anomaly_map(patch_scores, size, sigma, dense, mode)


def fill_gaps(patch_scores: torch.Tensor, width: int) -> torch.Tensor:
    """Grey-level closing over `width` x `width` patches (1: unchanged), edges extended.

    A patch scored lower than patches on both sides of it within the window rises toward
    their level, so a broad defect whose inside looks normal patch by patch keeps its area
    instead of its outline alone; a peak keeps its height and extent, and no score falls.
    """
    if width < 1:
        raise ValueError(f"gap-filling width must be at least 1 patch, got {width}")
    if width == 1:
        return patch_scores
    before, after = (width - 1) // 2, width // 2
    x = torch.as_tensor(patch_scores)
    x = (x if x.is_floating_point() else x.float())[None, None]
    # Dilation then erosion; the erosion's window is the dilation's mirrored.
    dilated = F.max_pool2d(F.pad(x, (before, after, before, after), mode="replicate"), width, 1)
    eroded = -F.max_pool2d(
        F.pad(-dilated, (after, before, after, before), mode="replicate"), width, 1
    )
    return eroded[0, 0]


def image_score(
    anomaly_map: np.ndarray | torch.Tensor, top_fraction: float = TOP_FRACTION
) -> float:
    """Mean of the highest `top_fraction` of the map: robust to a single hot pixel, yet
    sensitive to small defects that a whole-image mean would dilute."""
    return top_mean(anomaly_map, top_fraction).item()


def top_mean(anomaly_map: np.ndarray | torch.Tensor, top_fraction: float) -> torch.Tensor:
    """`image_score` as a 0-d tensor on the map's device."""
    values = _as_tensor(anomaly_map).flatten()
    k = max(1, int(round(values.numel() * top_fraction)))
    return values.topk(k).values.mean()


def ranking_score(
    patch_scores: np.ndarray | torch.Tensor, sigma: float, cells: int | None = None
) -> float:
    """The image score of patch scores: the top of their bilinear map at the fixed scale, made
    without gap filling (filling raises the busy texture of normal images too, blurring the
    ranking).

    cells: when tiling, the patches across one tile. The smoothing and the top share are then
    those of one tile, not of the whole image, so a tiled image scores as its worst tile-sized
    window would as one backbone input: at the image's scale, a defect of a few patches would
    be smoothed and averaged over tens of them and sink into normal variation."""
    return ranking_top(patch_scores, sigma, cells).item()


def ranking_top(
    patch_scores: np.ndarray | torch.Tensor, sigma: float, cells: int | None = None
) -> torch.Tensor:
    """`ranking_score` as a 0-d tensor on the scores' device."""
    if cells is None:
        return top_mean(score_map(patch_scores, sigma), TOP_FRACTION)
    rows, columns = patch_scores.shape[:2]
    top = min(1.0, TOP_FRACTION * cells * cells / (rows * columns))
    return top_mean(score_map(patch_scores, sigma * cells / min(rows, columns)), top)
