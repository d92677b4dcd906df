"""Inspecting at native resolution: an image cut into overlapping tiles of the backbone's
input size, whose feature grids are stitched into one grid of the whole image.

Each cell of the stitched grid comes from the tile whose centre is nearest to it, so the
cells near a tile's inner borders (where pooling and attention see less context) come from
its neighbour. Tile origins are multiples of the backbone's stride, so tile grids line up
with one grid over the whole image. Cost grows with pixels: `tile_count` says how many
backbone passes an image takes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_TILES = 64  # backbone passes per image at most; larger images are tiled at a lower scale
TILE_MARGIN = 1  # grid cells at each tile border that a neighbouring tile supplies instead


def tiled_size(
    height: int, width: int, scale: float, tile: int, step: int, margin: int
) -> tuple[int, int]:
    """The size (multiples of `step`) an image of `height` x `width` is tiled at: `scale`
    times its own, its short side at least one tile (aspect kept), and lowered until it
    takes at most `MAX_TILES` tiles; a strip too long even at one tile across has its long
    side held there (squeezed, as whole images are past `MAX_ASPECT`)."""
    if scale <= 0:
        raise ValueError(f"tile scale must be positive, got {scale}")
    scale = max(scale, tile / min(height, width))
    size = (height, width)
    while True:
        size = (
            max(tile, round(height * scale / step) * step),
            max(tile, round(width * scale / step) * step),
        )
        if tile_count(*size, tile, step, margin) <= MAX_TILES or min(size) <= tile:
            break
        scale *= 0.9
    longest = tile + (MAX_TILES - 1) * (tile - 2 * margin) // step * step
    return min(size[0], longest), min(size[1], longest)


def tile_origins(length: int, tile: int, step: int, margin: int) -> list[int]:
    """Tile starts along one axis of `length` px (multiples of `step`): tiles of `tile` px
    that cover it, neighbours overlapping by at least 2 * `margin` px."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - 2 * margin)) + 1
    return [round(i * (length - tile) / (count - 1) / step) * step for i in range(count)]


def tile_count(height: int, width: int, tile: int, step: int, margin: int) -> int:
    """Tiles (backbone passes) an image of that size takes."""
    return len(tile_origins(height, tile, step, margin)) * len(
        tile_origins(width, tile, step, margin)
    )


def owners(cells: int, origins: list[int], cell: int, tile_cells: int) -> tuple[np.ndarray, ...]:
    """For each of `cells` grid cells along an axis (of `cell` px each): the tile it is taken
    from (the one whose centre is nearest to the cell's) and its index in that tile."""
    centres = np.array(origins) + tile_cells * cell / 2
    positions = (np.arange(cells) + 0.5) * cell
    tiles = np.abs(positions[:, None] - centres[None, :]).argmin(axis=1)
    local = np.arange(cells) - np.array(origins)[tiles] // cell
    return tiles, local


def stitch(
    grids: torch.Tensor, rows: list[int], columns: list[int], size: tuple[int, int], cell: int
) -> torch.Tensor:
    """One (H / cell, W / cell, C) grid of an image of `size` (H, W) from its tiles' (h, w, C)
    grids `grids` (row-major, tiles starting at `rows` x `columns` px)."""
    tile_rows, tile_columns, channels = grids.shape[1:]
    tiled = grids.reshape(len(rows), len(columns), tile_rows, tile_columns, channels)
    row_tiles, row_cells = owners(size[0] // cell, rows, cell, tile_rows)
    column_tiles, column_cells = owners(size[1] // cell, columns, cell, tile_columns)

    def index(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, device=grids.device)

    return tiled[
        index(row_tiles)[:, None],
        index(column_tiles)[None, :],
        index(row_cells)[:, None],
        index(column_cells)[None, :],
    ]
