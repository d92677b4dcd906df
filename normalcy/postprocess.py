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


def resize_map(
    scale_map: torch.Tensor, size: tuple[int, int], rows: tuple[int, int] | None = None
) -> np.ndarray:
    """A map at the fixed scale resized bilinearly to an image of `size` (H, W): float32;
    `rows` (start, stop): only those rows of it, so a map of any size can be made in bands.

    A band is the separable form of the same resize: rows (R_y) times map times columns
    (R_x^T), with the weights of `F.interpolate(mode="bilinear", align_corners=False)`, so it
    costs what its pixels cost; it equals the whole map's rows within float32 rounding."""
    grid = _as_tensor(scale_map)
    if rows is None:
        if tuple(grid.shape) != tuple(size):
            grid = F.interpolate(
                grid[None, None], size=tuple(size), mode="bilinear", align_corners=False
            )[0, 0]
        return grid.cpu().numpy()
    start, stop = rows
    if not 0 <= start <= stop <= size[0]:
        raise ValueError(f"rows {rows} outside a map of {size[0]} rows")
    along_rows = _bilinear_weights(grid.shape[0], size[0], start, stop).to(grid.device)
    along_columns = _bilinear_weights(grid.shape[1], size[1], 0, size[1]).to(grid.device)
    band = along_rows @ grid.to(torch.float64) @ along_columns.T
    return band.float().cpu().numpy()


def _bilinear_weights(source: int, target: int, start: int, stop: int) -> torch.Tensor:
    """(stop - start, source) weights of target samples start..stop-1 of a bilinear resize
    from `source` to `target` samples (half-pixel centres, edges clamped)."""
    position = (torch.arange(start, stop, dtype=torch.float64) + 0.5) * (source / target) - 0.5
    position = position.clamp(min=0)
    below = position.floor().long().clamp(max=source - 1)
    above = (below + 1).clamp(max=source - 1)
    fraction = position - below
    weights = torch.zeros(stop - start, source, dtype=torch.float64)
    band = torch.arange(stop - start)
    weights[band, below] += 1 - fraction
    weights[band, above] += fraction
    return weights


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
    values = _as_tensor(anomaly_map).flatten()
    k = max(1, int(round(values.numel() * top_fraction)))
    return values.topk(k).values.mean().item()


def ranking_score(patch_scores: np.ndarray | torch.Tensor, sigma: float) -> float:
    """The image score of patch scores: the top of their bilinear map at the fixed scale, made
    without gap filling (filling raises the busy texture of normal images too, blurring the
    ranking)."""
    return image_score(score_map(patch_scores, sigma))
