"""Tests for normalcy.planting: defects planted with exact masks, of every kind and size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from normalcy.planting import (
    KINDS,
    LARGEST_SHARE,
    MAX_EXPOSURE,
    MAX_NOISE,
    SMALLEST,
    Variation,
    defect_size,
    plant,
    seamless_clone,
    vary,
)


def _board(seed: int = 0, shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    """Grey substrate with one-pixel traces and pads, a little noise."""
    rng = np.random.default_rng(seed)
    image = np.full((*shape, 3), 60.0)
    image[::8, :] = 200
    image[:, 5::12] = 200
    image[20:30, 40:52] = 230
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_exactly_the_pixels_its_mask_covers(kind: str) -> None:
    image = _board()
    for seed in range(5):
        planted = plant(image, np.random.default_rng(seed), kind)
        changed = (planted.image != image).any(axis=2)
        np.testing.assert_array_equal(planted.mask, changed)  # both are boolean
        assert planted.mask.sum() >= 4 and planted.kind == kind
        assert planted.image.dtype == np.uint8 and planted.image.shape == image.shape


def test_planted_defects_stay_small_next_to_the_image() -> None:
    image = _board(shape=(200, 300))
    for seed in range(30):
        planted = plant(image, np.random.default_rng(seed))
        rows, cols = np.nonzero(planted.mask)
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        assert extent <= 2 * LARGEST_SHARE * 200 + 2  # a warp or blend may spread a little
        assert planted.mask.mean() < 0.05


def test_sizes_run_from_a_few_pixels_to_a_tenth_of_the_short_side() -> None:
    rng = np.random.default_rng(0)
    sizes = [defect_size((480, 640, 3), rng) for _ in range(2000)]
    assert min(sizes) == SMALLEST and max(sizes) == int(LARGEST_SHARE * 480)
    assert np.median(sizes) < 20  # log-uniform: small defects as often as large ones


def test_planting_is_deterministic_for_a_seed_and_leaves_the_input_alone() -> None:
    image = _board()
    original = image.copy()
    first = plant(image, np.random.default_rng(3))
    again = plant(image, np.random.default_rng(3))
    np.testing.assert_array_equal(first.image, again.image)  # the same integer pixels
    np.testing.assert_array_equal(image, original)
    assert first.kind == again.kind and first.size == again.size


def test_a_bad_image_or_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        plant(np.zeros((10, 10)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown defect kind 'scratch'"):
        plant(_board(), np.random.default_rng(0), "scratch")


def test_a_varied_image_is_the_same_scene_in_other_exposure_and_noise() -> None:
    image = _board()
    varied = vary(image, np.random.default_rng(1), Variation(exposure=0.2, noise=2.0))
    assert varied.shape == image.shape and varied.dtype == np.uint8
    difference = varied.astype(int) - image
    assert (difference != 0).mean() > 0.5  # exposure and noise touch most pixels
    correlation = np.corrcoef(varied.ravel(), image.ravel())[0, 1]
    assert correlation > 0.95  # but it is the same scene


def test_images_that_never_drift_are_not_varied() -> None:
    rng = np.random.default_rng(0)
    layouts = [np.kron(rng.random((8, 8)) > 0.5, np.ones((8, 8))) for _ in range(4)]
    binarised = [
        np.repeat(255 * layout[..., None], 3, axis=2).astype(np.uint8) for layout in layouts
    ]
    variation = Variation.of(binarised)
    assert variation == Variation(0.0, 0.0) and not variation.any
    assert np.array_equal(vary(binarised[0], rng, variation), binarised[0])


def test_variation_follows_the_drift_and_noise_the_images_show() -> None:
    rng = np.random.default_rng(0)
    scene = np.linspace(40, 200, 64)[None, :, None] * np.ones((64, 1, 1))  # smooth: no texture

    def shot(gain: float, noise: float) -> np.ndarray:
        pixels = scene * gain + rng.normal(0, noise, (64, 64, 3))
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    steady = Variation.of([shot(1.0, 0.5) for _ in range(6)])
    drifting = Variation.of([shot(g, 1.5) for g in (0.85, 0.95, 1.0, 1.05, 1.15, 0.9)])
    assert drifting.exposure > 4 * steady.exposure and drifting.noise > steady.noise
    wild = Variation.of([shot(g, 30.0) for g in (0.3, 1.0, 0.5, 1.2)])
    assert (wild.exposure, wild.noise) == (MAX_EXPOSURE, MAX_NOISE)  # capped


def test_a_seamless_paste_keeps_the_source_gradients_and_meets_the_target_at_the_border() -> None:
    rng = np.random.default_rng(4)
    target = rng.uniform(0, 255, (40, 50, 3)).astype(np.float32)
    source = rng.uniform(0, 255, (40, 50, 3)).astype(np.float32)
    region = np.zeros((40, 50), dtype=bool)
    region[10:25, 0:20] = True  # touches the image's left edge
    region[30:33, 30:45] = True  # a second piece
    out = seamless_clone(target, source, region)
    np.testing.assert_array_equal(out[~region], target[~region])
    # What was added to the source is harmonic inside the region: the source's gradients
    # are kept; at the image edge the border is free (no neighbour), elsewhere the target's.
    added = np.where(region[..., None], out - source, target - source)
    laplacian = np.stack([ndimage.laplace(added[..., c], mode="nearest") for c in range(3)], -1)
    assert np.abs(laplacian[region]).max() < 1e-2
    # A source that is the target brightened by a constant pastes back as the target itself.
    np.testing.assert_allclose(seamless_clone(target, target + 30, region), target, atol=1e-3)


def test_half_the_copied_patches_are_blended_without_a_step_at_their_border() -> None:
    image = np.clip(np.linspace(20, 230, 160)[None, :, None] + np.zeros((120, 1, 3)), 0, 255)
    image = image.astype(np.uint8)  # a brightness ramp: a plain paste leaves a step
    steps = []
    for seed in range(12):
        planted = plant(image, np.random.default_rng(seed), "copied", size=12)
        border = ndimage.binary_dilation(planted.mask) & ~planted.mask
        inner = planted.mask & ~ndimage.binary_erosion(planted.mask)
        if inner.any() and border.any():
            jump = abs(float(planted.image[inner].mean()) - float(image[border].mean()))
            steps.append(jump)
    assert min(steps) < 5 < max(steps)  # blended ones meet their surroundings, pasted ones not
