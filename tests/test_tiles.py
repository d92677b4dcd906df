"""Tests for tiled inspection: tile geometry, stitching, and small defects found only in tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close
from torch import nn

from normalcy import Detector
from normalcy.backbones import Backbone, aggregate
from normalcy.backbones.tiles import MAX_TILES, owners, tile_count, tile_origins, tiled_size


@pytest.mark.parametrize("length", [224, 238, 400, 644, 1000, 2240])
@pytest.mark.parametrize(("tile", "step", "margin"), [(224, 14, 14), (64, 16, 8), (112, 14, 0)])
def test_tiles_cover_every_pixel_with_the_overlap_asked(
    length: int, tile: int, step: int, margin: int
) -> None:
    length = max(tile, length // step * step)
    origins = tile_origins(length, tile, step, margin)
    assert origins[0] == 0 and origins[-1] == length - tile
    assert all(o % step == 0 for o in origins)
    covered = np.zeros(length, dtype=bool)
    for origin in origins:
        covered[origin : origin + tile] = True
    assert covered.all()
    for left, right in zip(origins, origins[1:], strict=False):
        assert left + tile - right >= 2 * margin - step  # overlap, up to rounding to the step


def test_each_cell_comes_from_the_tile_where_it_is_farthest_from_an_inner_border() -> None:
    cell, tile_cells, length = 14, 16, 46 * 14
    origins = tile_origins(length, tile_cells * cell, cell, cell)
    tiles, local = owners(length // cell, origins, cell, tile_cells)
    assert ((local >= 0) & (local < tile_cells)).all()
    for k in range(length // cell):
        assert origins[tiles[k]] // cell + local[k] == k  # the same cell of the image
        inner = 0 < tiles[k] < len(origins) - 1
        if inner:
            assert 1 <= local[k] <= tile_cells - 2  # not on the tile's own border


def test_large_images_are_tiled_at_a_lower_scale_within_the_tile_limit() -> None:
    size = tiled_size(8000, 8000, 1.0, 224, 14, 14)
    assert tile_count(*size, 224, 14, 14) <= MAX_TILES
    assert tiled_size(300, 200, 1.0, 224, 14, 14) == (336, 224)  # short side up to a tile
    assert tiled_size(640, 640, 0.5, 224, 14, 14) == (322, 322)
    for strip in ((4, 4000), (10, 100_000), (100_000, 10)):  # one tile across, far too long
        assert tile_count(*tiled_size(*strip, 1.0, 224, 14, 14), 224, 14, 14) <= MAX_TILES


class _Cells(nn.Module):
    """A stand-in network whose features are each 8 x 8 cell's mean colour: purely local."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [nn.functional.avg_pool2d(x, 8)]


def test_an_image_size_off_the_stride_still_tiles_whole_cells() -> None:
    tiled = Backbone("cells", _Cells(), 8, 36, 1, (0,), tile_scale=1.0)  # tiles of 32 px
    image = np.random.default_rng(1).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    (grid,) = tiled.features([image])
    assert grid.shape == (12, 11, 3)


def test_stitched_features_equal_the_whole_images_where_features_are_local() -> None:
    tiled = Backbone("cells", _Cells(), 8, 32, 1, (0,), context=1.0, tile_scale=1.0)
    image = np.random.default_rng(0).integers(0, 256, (96, 72, 3), dtype=np.uint8)
    (stitched,) = tiled.features([image], batch_size=3)  # 5 x 4 tiles, in batches of 3
    whole = aggregate(tiled(tiled.preprocess(image, (96, 72))[None]), 1, 1.0)
    whole = whole[0].permute(1, 2, 0)
    assert stitched.shape == whole.shape == (12, 9, 6)
    torch.testing.assert_close(stitched, whole)


def _board(seed: int, defect: bool = False) -> np.ndarray:
    """A 384 px grid of 1 px traces with a little noise; the defect is an 8 px gap in one."""
    rng = np.random.default_rng(seed)
    image = np.full((384, 384, 3), 40, dtype=np.uint8)
    image[:, 6::24] = image[6::24, :] = 220
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    if defect:
        image[150:158, 149:152] = 40  # breaks the vertical trace at column 150
    return image


def test_a_few_pixel_defect_in_a_large_image_is_found_only_in_tiles() -> None:
    normal = [_board(i) for i in range(6)]
    tests = [_board(100 + i) for i in range(4)] + [_board(200, defect=True)]
    found = {}
    for tile_scale in (None, 1.0):
        detector = Detector(
            backbone="efficientnet_lite0", image_size=64, tile_scale=tile_scale, threshold=0.0
        ).fit(normal)
        scores = [p.score for p in detector.predict(tests)]
        found[tile_scale] = scores[-1] / max(scores[:-1])
    assert found[1.0] > 1.25  # the broken trace stands above every normal board
    assert found[None] < 1.1  # at 64 px for the whole board it is lost in the noise


def test_a_tiled_model_saves_its_scale_and_scores_the_same_loaded(tmp_path) -> None:
    normal = [_board(i) for i in range(3)]
    detector = Detector(backbone="efficientnet_lite0", image_size=64, tile_scale=1.0).fit(normal)
    loaded = Detector.load(detector.save(tmp_path / "tiled"))
    assert loaded.setting.tile_scale == 1.0 and loaded.decode_side is None
    test = _board(200, defect=True)
    assert_close(loaded.predict(test).score, detector.predict(test).score)
    assert loaded.map_settings().score_cells == 8  # scores smooth per 64 px tile of 8 px cells
    assert Detector(backbone="efficientnet_lite0").map_settings().score_cells is None
    with pytest.raises(ValueError, match="dense map is not available with tiles"):
        Detector(tile_scale=1.0, dense_map=True)
    with pytest.raises(ValueError, match="tile_scale must be in"):
        Detector(tile_scale=0)
