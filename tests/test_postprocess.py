"""Tests for normalcy.postprocess: maps at image size, image scores and thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy.postprocess import (
    SIGMA_AT_256,
    TOP_FRACTION,
    anomaly_map,
    fill_gaps,
    image_score,
    threshold_at_fpr,
)

# --- anomaly_map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (80, 96), (257, 31), (8, 10)])
def test_map_has_the_requested_size_and_float32(size: tuple[int, int]) -> None:
    patches = np.random.default_rng(0).random((8, 10))
    full = anomaly_map(patches, size, SIGMA_AT_256)
    assert full.shape == size and full.dtype == np.float32
    assert np.isfinite(full).all()


def test_without_smoothing_a_constant_map_stays_constant() -> None:
    full = anomaly_map(np.full((4, 6), 2.5), (40, 60), sigma=0)
    np.testing.assert_allclose(full, 2.5, rtol=1e-6)


def test_upsampling_is_bilinear_between_patch_centres() -> None:
    patches = np.array([[0.0, 1.0]])  # two patches side by side
    row = anomaly_map(patches, (1, 8), sigma=0)[0]
    assert row[:2].tolist() == [0.0, 0.0] and row[-2:].tolist() == [1.0, 1.0]
    assert np.all(np.diff(row) >= 0) and 0 < row[4] < 1


def test_a_dense_grid_puts_each_patch_centre_at_its_place_in_the_image() -> None:
    # Plain grid of 4 patches of 8 px over 32 px: the half-stride grid has 7 centres, at
    # 4, 8, ..., 28 px. A spike at dense patch j must peak at pixel 4 (j + 1).
    for j in range(7):
        patches = np.zeros((1, 7))
        patches[0, j] = 1.0
        row = anomaly_map(patches, (1, 33), sigma=0, dense=True)[0]
        centre = 4 * (j + 1)
        assert row[centre] == pytest.approx(1.0)
        for neighbour in (centre - 4, centre + 4):  # the centres of the patches beside it
            if 4 <= neighbour <= 28:
                assert row[neighbour] == pytest.approx(0.0, abs=1e-6)


def test_a_dense_grid_keeps_a_constant_map_constant_up_to_the_edges() -> None:
    full = anomaly_map(np.full((7, 11), 1.5), (40, 60), sigma=SIGMA_AT_256, dense=True)
    np.testing.assert_allclose(full, 1.5, rtol=1e-6)


# --- fill_gaps -----------------------------------------------------------------------------------


def test_filling_lifts_the_inside_of_an_outline_to_the_outline() -> None:
    patches = np.zeros((7, 7))
    patches[2:5, 2:5] = 1.0
    patches[3, 3] = 0.2  # a patch inside the defect that looks normal
    filled = fill_gaps(patches, 3)
    assert filled[3, 3] == 1.0
    np.testing.assert_array_equal(filled[patches != 0.2], patches[patches != 0.2])


def test_filling_closes_gaps_narrower_than_the_window_only() -> None:
    narrow = fill_gaps(np.array([[1.0, 0.0, 0.0, 1.0]]), 3)
    wide = fill_gaps(np.array([[1.0, 0.0, 0.0, 0.0, 1.0]]), 3)
    np.testing.assert_array_equal(narrow, [[1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(wide, [[1.0, 0.0, 0.0, 0.0, 1.0]])


def test_filling_keeps_an_isolated_peak_and_never_lowers_a_score() -> None:
    spike = np.zeros((9, 9))
    spike[4, 4] = 3.0
    np.testing.assert_array_equal(fill_gaps(spike, 3), spike)
    noise = np.random.default_rng(2).random((12, 15))
    assert (fill_gaps(noise, 5) >= noise).all()


def test_filling_one_patch_wide_changes_nothing_and_zero_is_refused() -> None:
    patches = np.random.default_rng(3).random((4, 5))
    assert fill_gaps(patches, 1) is patches
    with pytest.raises(ValueError, match="at least 1 patch"):
        fill_gaps(patches, 0)


def test_smoothing_roughly_preserves_the_mean() -> None:
    patches = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    sharp = anomaly_map(patches, (256, 256), sigma=0)
    smooth = anomaly_map(patches, (256, 256), sigma=SIGMA_AT_256)
    assert smooth.mean() == pytest.approx(sharp.mean(), rel=0.02)
    assert smooth.std() < sharp.std()  # and it does smooth


def test_smoothing_spreads_a_spike() -> None:
    patches = np.zeros((16, 16), dtype=np.float32)
    patches[8, 8] = 1.0
    sharp = anomaly_map(patches, (256, 256), sigma=0)
    smooth = anomaly_map(patches, (256, 256), sigma=SIGMA_AT_256)
    assert smooth.max() < sharp.max()
    assert np.count_nonzero(smooth > 1e-3) > np.count_nonzero(sharp > 1e-3)
    peak = np.unravel_index(np.argmax(smooth), smooth.shape)
    assert abs(peak[0] - 136) <= 8 and abs(peak[1] - 136) <= 8  # the spike stays in place
    assert smooth[0, 0] == pytest.approx(0.0, abs=1e-6)  # but does not reach far


def test_smoothing_scales_with_the_image_size() -> None:
    # The same patch map at twice the size is smoothed twice as wide, so it looks the same.
    patches = np.zeros((8, 8), dtype=np.float32)
    patches[3, 4] = 1.0
    small = anomaly_map(patches, (128, 128), SIGMA_AT_256)
    large = anomaly_map(patches, (256, 256), SIGMA_AT_256)
    binned = large.reshape(128, 2, 128, 2).mean(axis=(1, 3))  # back to 128 x 128
    np.testing.assert_allclose(binned, small, atol=0.01 * small.max())


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


# --- threshold_at_fpr ----------------------------------------------------------------------------


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 7, 20, 100, 333])
def test_at_most_fpr_of_normal_scores_exceed_the_threshold(fpr: float, n: int) -> None:
    scores = np.random.default_rng(n).standard_normal(n)
    threshold = threshold_at_fpr(scores, fpr)
    exceeding = np.count_nonzero(scores > threshold)
    assert exceeding <= fpr * n
    # ...and it is the smallest such threshold among the scores: one step lower exceeds more.
    lower = np.sort(scores)[np.sort(scores) < threshold]
    if lower.size:
        assert np.count_nonzero(scores > lower[-1]) > fpr * n


def test_fpr_zero_gives_the_maximum() -> None:
    scores = np.array([0.3, 5.0, 1.2, -4.0])
    assert threshold_at_fpr(scores, 0.0) == 5.0
    assert threshold_at_fpr(scores, 0.2) == 5.0  # 0.2 * 4 < 1: no score may exceed it


def test_threshold_with_ties_never_lets_more_than_fpr_through() -> None:
    scores = np.array([1.0, 2.0, 3.0, 3.0, 3.0])
    threshold = threshold_at_fpr(scores, 0.2)
    assert np.count_nonzero(scores > threshold) <= 1


def test_threshold_accepts_lists_and_returns_float() -> None:
    threshold = threshold_at_fpr([1, 2, 3, 4], 0.25)
    assert isinstance(threshold, float) and threshold == 3.0


@pytest.mark.parametrize("fpr", [-0.01, 1.0, 1.5])
def test_fpr_outside_zero_to_one_is_rejected(fpr: float) -> None:
    with pytest.raises(ValueError, match="false-positive rate"):
        threshold_at_fpr(np.arange(10.0), fpr)


def test_threshold_without_scores_is_rejected() -> None:
    with pytest.raises(ValueError, match="no normal scores"):
        threshold_at_fpr(np.array([]), 0.1)
