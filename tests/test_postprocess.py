"""Tests for normalcy.postprocess: maps at image size, image scores and thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close
from scipy import ndimage

from normalcy.postprocess import (
    MAP_PIXELS_PER_PATCH,
    SIGMA_AT_256,
    TOP_FRACTION,
    anomaly_map,
    fill_gaps,
    gaussian_smooth,
    image_score,
    ranking_score,
    score_map,
)
from normalcy.prediction import resize_map

# --- anomaly_map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (80, 96), (257, 31), (8, 10)])
def test_map_has_the_requested_size_and_float32(size: tuple[int, int]) -> None:
    patches = np.random.default_rng(0).random((8, 10))
    full = anomaly_map(patches, size, SIGMA_AT_256)
    assert torch.is_tensor(full) and full.shape == size and full.dtype == torch.float32
    assert torch.isfinite(full).all()


def test_without_smoothing_a_constant_map_stays_constant() -> None:
    full = anomaly_map(np.full((4, 6), 2.5), (40, 60), sigma=0).numpy()
    assert_close(full, 2.5)


def test_upsampling_is_bilinear_between_patch_centres() -> None:
    patches = np.array([[0.0, 1.0]])  # two patches side by side
    row = anomaly_map(patches, (1, 8), sigma=0)[0].numpy()
    assert row[:2].tolist() == [0.0, 0.0] and row[-2:].tolist() == [1.0, 1.0]
    assert np.all(np.diff(row) >= 0) and 0 < row[4] < 1


def test_a_dense_grid_puts_each_patch_centre_at_its_place_in_the_image() -> None:
    # Plain grid of 4 patches of 8 px over 32 px: the half-stride grid has 7 centres, at
    # 4, 8, ..., 28 px. A spike at dense patch j must peak at pixel 4 (j + 1).
    for j in range(7):
        patches = np.zeros((1, 7))
        patches[0, j] = 1.0
        row = anomaly_map(patches, (1, 33), sigma=0, dense=True)[0].numpy()
        centre = 4 * (j + 1)
        assert row[centre] == pytest.approx(1.0)
        for neighbour in (centre - 4, centre + 4):  # the centres of the patches beside it
            if 4 <= neighbour <= 28:
                assert row[neighbour] == pytest.approx(0.0, abs=1e-6)


def test_a_dense_grid_keeps_a_constant_map_constant_up_to_the_edges() -> None:
    full = anomaly_map(np.full((7, 11), 1.5), (40, 60), sigma=SIGMA_AT_256, dense=True).numpy()
    assert_close(full, 1.5)


# --- fill_gaps -----------------------------------------------------------------------------------
# A closing only takes maxima and minima: it returns the inputs' own bits, never rounds, so its
# results are compared exactly.


def test_filling_lifts_the_inside_of_an_outline_to_the_outline() -> None:
    patches = np.zeros((7, 7))
    patches[2:5, 2:5] = 1.0
    patches[3, 3] = 0.2  # a patch inside the defect that looks normal
    filled = np.asarray(fill_gaps(patches, 3))
    assert filled[3, 3] == 1.0
    np.testing.assert_array_equal(filled[patches != 0.2], patches[patches != 0.2])


def test_filling_closes_gaps_narrower_than_the_window_only() -> None:
    narrow = np.asarray(fill_gaps(np.array([[1.0, 0.0, 0.0, 1.0]]), 3))
    wide = np.asarray(fill_gaps(np.array([[1.0, 0.0, 0.0, 0.0, 1.0]]), 3))
    np.testing.assert_array_equal(narrow, [[1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(wide, [[1.0, 0.0, 0.0, 0.0, 1.0]])


def test_filling_keeps_an_isolated_peak_and_never_lowers_a_score() -> None:
    spike = np.zeros((9, 9))
    spike[4, 4] = 3.0
    np.testing.assert_array_equal(np.asarray(fill_gaps(spike, 3)), spike)
    # float32, as patch scores are: the closing computes in float32
    noise = np.random.default_rng(2).random((12, 15)).astype(np.float32)
    assert (np.asarray(fill_gaps(noise, 5)) >= noise).all()
    tensor = torch.from_numpy(noise)
    assert (fill_gaps(tensor, 5) >= tensor).all()


def test_filling_one_patch_wide_changes_nothing_and_zero_is_refused() -> None:
    patches = np.random.default_rng(3).random((4, 5))
    assert fill_gaps(patches, 1) is patches
    tensor = torch.from_numpy(patches)
    assert fill_gaps(tensor, 1) is tensor
    with pytest.raises(ValueError, match="at least 1 patch"):
        fill_gaps(patches, 0)


def test_smoothing_roughly_preserves_the_mean() -> None:
    patches = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    sharp = anomaly_map(patches, (256, 256), sigma=0).numpy()
    smooth = anomaly_map(patches, (256, 256), sigma=SIGMA_AT_256).numpy()
    assert smooth.mean() == pytest.approx(sharp.mean(), rel=0.02)
    assert smooth.std() < sharp.std()  # and it does smooth


def test_smoothing_spreads_a_spike() -> None:
    patches = np.zeros((16, 16), dtype=np.float32)
    patches[8, 8] = 1.0
    sharp = anomaly_map(patches, (256, 256), sigma=0).numpy()
    smooth = anomaly_map(patches, (256, 256), sigma=SIGMA_AT_256).numpy()
    assert smooth.max() < sharp.max()
    assert np.count_nonzero(smooth > 1e-3) > np.count_nonzero(sharp > 1e-3)
    peak = np.unravel_index(np.argmax(smooth), smooth.shape)
    assert abs(peak[0] - 136) <= 8 and abs(peak[1] - 136) <= 8  # the spike stays in place
    assert smooth[0, 0] == pytest.approx(0.0, abs=1e-6)  # but does not reach far


def test_smoothing_scales_with_the_image_size() -> None:
    # The same patch map at twice the size is smoothed twice as wide, so it looks the same.
    patches = np.zeros((8, 8), dtype=np.float32)
    patches[3, 4] = 1.0
    small = anomaly_map(patches, (128, 128), SIGMA_AT_256).numpy()
    large = anomaly_map(patches, (256, 256), SIGMA_AT_256).numpy()
    binned = large.reshape(128, 2, 128, 2).mean(axis=(1, 3))  # back to 128 x 128
    np.testing.assert_allclose(binned, small, atol=0.01 * small.max())


# --- gaussian_smooth, score_map, resize_map ------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0, 7.3])
def test_gaussian_smooth_equals_scipy_gaussian_filter_with_nearest_edges(sigma: float) -> None:
    image = np.random.default_rng(5).random((37, 45)).astype(np.float32)
    smooth = gaussian_smooth(torch.from_numpy(image), sigma)
    assert smooth.shape == image.shape and smooth.dtype == torch.float32
    expected = ndimage.gaussian_filter(
        image.astype(np.float64), sigma, mode="nearest", truncate=3.0
    )
    np.testing.assert_allclose(smooth.numpy(), expected, rtol=0, atol=1e-5)


def test_gaussian_smooth_without_sigma_changes_nothing() -> None:
    image = torch.rand(5, 6)
    assert gaussian_smooth(image, 0) is image


@pytest.mark.parametrize("width", [2, 3, 4, 5])
def test_fill_gaps_equals_scipy_grey_closing_with_nearest_edges(width: int) -> None:
    patches = np.random.default_rng(width).random((13, 17)).astype(np.float32)
    filled = fill_gaps(torch.from_numpy(patches), width)
    assert filled.shape == patches.shape and filled.dtype == torch.float32
    expected = ndimage.grey_closing(patches, size=(width, width), mode="nearest")
    np.testing.assert_array_equal(filled.numpy(), expected)  # maxima of minima: no rounding


@pytest.mark.parametrize("shape", [(6, 9), (1, 1), (14, 5)])
def test_score_map_of_a_grid_and_of_its_dense_grid_has_fixed_pixels_per_patch(
    shape: tuple[int, int],
) -> None:
    rows, cols = shape
    expected = (MAP_PIXELS_PER_PATCH * rows, MAP_PIXELS_PER_PATCH * cols)
    assert MAP_PIXELS_PER_PATCH == 8
    plain = score_map(np.random.default_rng(0).random(shape), SIGMA_AT_256)
    assert tuple(plain.shape) == expected and plain.dtype == torch.float32
    dense_grid = torch.rand(2 * rows - 1, 2 * cols - 1)
    dense = score_map(dense_grid, SIGMA_AT_256, dense=True)
    assert tuple(dense.shape) == expected and dense.dtype == torch.float32


@pytest.mark.parametrize("size", [(48, 64), (100, 37), (2000, 2600)])
def test_resize_map_gives_a_float32_array_of_the_size_and_keeps_a_constant_constant(
    size: tuple[int, int],
) -> None:
    constant = score_map(torch.full((6, 8), 0.75), SIGMA_AT_256)
    resized = resize_map(constant, size)
    assert isinstance(resized, np.ndarray) and resized.dtype == np.float32
    assert resized.shape == size
    assert_close(resized, 0.75)
    varied = score_map(torch.rand(6, 8), SIGMA_AT_256)
    assert resize_map(varied, size).shape == size
    # To its own size each pixel's weights are 1 and 0: the values come back bit for bit.
    np.testing.assert_array_equal(resize_map(varied, tuple(varied.shape)), varied.numpy())


@pytest.mark.parametrize("dense", [False, True])
def test_the_image_score_does_not_depend_on_the_image_pixel_count(dense: bool) -> None:
    rng = np.random.default_rng(7)
    grid = ndimage.gaussian_filter(rng.random((20, 26)), 1.5) * 3  # a random smooth grid
    if dense:
        grid = ndimage.zoom(grid, (39 / 20, 51 / 26), order=1)
        assert grid.shape == (39, 51)
    at_scale = image_score(score_map(grid, SIGMA_AT_256, dense=dense))
    at_image = image_score(anomaly_map(grid, (2000, 2600), SIGMA_AT_256, dense=dense))
    assert at_scale == pytest.approx(at_image, rel=0.02)


def test_a_tiled_image_scores_as_its_worst_tile_would_alone() -> None:
    tile = np.zeros((28, 28), dtype=np.float32)
    tile[13:15, 13:15] = 1.0  # a defect of 2 x 2 patches in the middle of a tile
    large = np.zeros((112, 140), dtype=np.float32)  # an image 4 x 5 tiles large
    large[56:84, 28:56] = tile
    one_tile = ranking_score(tile, SIGMA_AT_256)
    assert_close(ranking_score(large, SIGMA_AT_256, cells=28), one_tile)
    # Smoothed and averaged at the image's scale instead, the defect all but vanishes.
    assert ranking_score(large, SIGMA_AT_256) < 0.2 * one_tile
    assert_close(ranking_score(tile, SIGMA_AT_256, cells=28), one_tile)  # a grid of one tile


@pytest.mark.parametrize(("grid", "size"), [((16, 21), (480, 640)), ((40, 30), (37, 25))])
def test_resize_map_is_torchs_bilinear_resize_and_its_bands_are_its_rows(
    grid: tuple[int, int], size: tuple[int, int]
) -> None:
    scale_map = torch.from_numpy(np.random.default_rng(3).random(grid, dtype=np.float32))
    expected = torch.nn.functional.interpolate(
        scale_map[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    whole = resize_map(scale_map, size)
    assert whole.dtype == np.float32
    np.testing.assert_allclose(whole, expected, atol=1e-5)  # float32 rounding of the weights
    bands = [resize_map(scale_map, size, (r, min(r + 7, size[0]))) for r in range(0, size[0], 7)]
    # A row's weights and sums do not depend on the band it is made in: the same bits.
    np.testing.assert_array_equal(np.concatenate(bands), whole)
    with pytest.raises(ValueError, match="outside a map"):
        resize_map(scale_map, size, (0, size[0] + 1))


# --- image_score ---------------------------------------------------------------------------------


def test_image_score_is_the_mean_of_the_top_percent() -> None:
    values = np.random.default_rng(2).permutation(np.arange(1000, dtype=np.float32))
    top_ten = np.arange(990, 1000).mean()
    assert TOP_FRACTION == 0.01
    assert image_score(values.reshape(20, 50)) == pytest.approx(top_ten)


def test_image_score_of_a_small_map_uses_at_least_one_pixel() -> None:
    assert image_score(np.array([[0.1, 0.7], [0.3, 0.2]])) == pytest.approx(0.7)


def test_image_score_ignores_a_single_hot_pixel_more_than_max_would() -> None:
    scores = np.zeros((100, 100), dtype=np.float32)
    scores[0, 0] = 100.0
    assert image_score(scores) == pytest.approx(1.0)  # 100 / 100 top pixels


def test_image_score_with_another_fraction() -> None:
    values = np.arange(100, dtype=np.float64).reshape(10, 10)
    assert image_score(values, top_fraction=0.1) == pytest.approx(np.arange(90, 100).mean())
    assert image_score(values, top_fraction=1.0) == pytest.approx(values.mean())
    assert isinstance(image_score(values), float)
    as_tensor = torch.from_numpy(values)
    assert image_score(as_tensor, top_fraction=0.1) == pytest.approx(np.arange(90, 100).mean())
    assert isinstance(image_score(as_tensor), float)
