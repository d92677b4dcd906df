"""Pure functions on images and feature grids that every backbone shares: the resized
network input, the half-stride views of the dense map, and the aggregation of layer outputs
into one L2-comparable patch descriptor (with its image-context half)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def network_input(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB pixels -> (3, h, w) float in [0, 1] at `size` (h, w), by an
    antialiased bilinear resize (exported graphs run this same function)."""
    tensor = pixels.permute(2, 0, 1)[None].float()
    # Scaled to [0, 1] after the resize, on the fewer pixels (resizing is linear).
    resized = F.interpolate(tensor, size=size, mode="bilinear", antialias=True)
    return (resized[0] / 255.0).clamp(0, 1)


def half_stride_views(batch: torch.Tensor, shift: int) -> torch.Tensor:
    """(4B, 3, H, W): each image as is, then moved up by `shift` px, left, and both; the
    edge uncovered is mirrored in (its patches are dropped by `interleave`)."""
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (0, shift, 0, shift), mode="reflect")
    views = [
        padded[..., dy : dy + height, dx : dx + width] for dy in (0, shift) for dx in (0, shift)
    ]
    return torch.stack(views, dim=1).flatten(0, 1)


def interleave(grids: torch.Tensor) -> torch.Tensor:
    """(4B, C, h, w) grids of `half_stride_views` -> (B, C, 2h - 1, 2w - 1) at half stride;
    the last row and column of the shifted views, which see the mirrored edge, are dropped."""
    views = grids.unflatten(0, (-1, 2, 2))  # (B, dy, dx, C, h, w)
    batch, _, _, channels, height, width = views.shape
    dense = views.permute(0, 3, 4, 1, 5, 2).reshape(batch, channels, 2 * height, 2 * width)
    return dense[..., :-1, :-1]


def aggregate(
    maps: list[torch.Tensor], pool: int, context: float = 0.0, views: int = 1
) -> torch.Tensor:
    """One (B, C, h, w) grid: each layer locally averaged over `pool` x `pool` patches,
    resized to the finest grid, L2-normalised so every layer weighs the same, concatenated.

    context > 0 appends each patch's difference from its own image's median patch, times
    `context` (channels double): a patch is then judged both by how it looks and by how it
    stands out from the rest of its image. With `views` > 1 the batch holds that many
    consecutive views of each image, and the median patch is the first view's.
    """
    height, width = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
    parts = []
    for grid in maps:
        if pool > 1:
            grid = F.avg_pool2d(grid, pool, stride=1, padding=pool // 2, count_include_pad=False)
        if grid.shape[-2:] != (height, width):
            grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        parts.append(F.normalize(grid, dim=1))
    return with_context(torch.cat(parts, dim=1), context, views)


def lower_median(values: torch.Tensor) -> torch.Tensor:
    """`values.median(dim=-1).values` (the lower of the two middle values), by a k-smallest
    selection that exports to ONNX, where the median does not."""
    k = (values.shape[-1] - 1) // 2 + 1
    return values.topk(k, dim=-1, largest=False).values[..., -1]


def with_context(features: torch.Tensor, context: float, views: int = 1) -> torch.Tensor:
    """(B, C, h, w) features, and with `context` > 0 each patch's difference from its
    image's median patch appended (see `aggregate`)."""
    if context <= 0:
        return features
    median = lower_median(features[::views].flatten(2))[..., None, None]
    median = median.repeat_interleave(views, dim=0)
    return torch.cat([features, context * (features - median)], dim=1)
