from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from normalcy.visualize import (
    OUTLINE_COLOUR,
    encode_png,
    heatmap,
    overlay,
    save_png,
    thumbnail,
    write_atomic,
)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def test_heatmap_is_uint8_rgb_and_brightens_with_value() -> None:
    ramp = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    colours = heatmap(ramp, 0.0, 1.0)
    assert colours.shape == (8, 8, 3) and colours.dtype == np.uint8
    assert np.all(np.diff(_luminance(colours.reshape(-1, 3))) >= 0)
    assert _luminance(colours[0, 0]) < 10 and _luminance(colours[-1, -1]) > 200


def test_heatmap_clips_values_outside_range() -> None:
    colours = heatmap(np.array([[-5.0, 0.0, 1.0, 9.0]]), 0.0, 1.0)
    np.testing.assert_array_equal(colours[0, 0], colours[0, 1])
    np.testing.assert_array_equal(colours[0, 2], colours[0, 3])


def test_heatmap_with_equal_bounds_does_not_divide_by_zero() -> None:
    with np.errstate(all="raise"):
        colours = heatmap(np.full((4, 5), 3.0), 3.0, 3.0)
    assert np.all(colours == colours[0, 0])


def test_overlay_blends_image_and_heatmap() -> None:
    image = np.full((6, 7, 3), 100, dtype=np.uint8)
    anomaly_map = np.zeros((6, 7))
    assert np.array_equal(overlay(image, anomaly_map, 0.0, 1.0, alpha=0.0), image)
    full = overlay(image, anomaly_map, 0.0, 1.0, alpha=1.0)
    np.testing.assert_array_equal(full, heatmap(anomaly_map, 0.0, 1.0))
    half = overlay(image, anomaly_map, 0.0, 1.0, alpha=0.5).astype(int)
    expected = (100 + heatmap(anomaly_map, 0.0, 1.0).astype(int)) / 2
    assert np.all(np.abs(half - expected) <= 1)


def test_overlay_rejects_map_of_other_size() -> None:
    with pytest.raises(ValueError, match="does not match"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5)), 0.0, 1.0)


def test_overlay_draws_mask_outline_but_not_its_interior() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:15, 5:15] = True
    out = overlay(image, np.zeros((20, 20)), 0.0, 1.0, mask=mask)
    outlined = np.all(out == OUTLINE_COLOUR, axis=2)
    assert outlined[5, 5] and outlined[6, 10] and outlined[14, 14]
    assert not outlined[10, 10]  # interior keeps the heatmap
    assert not outlined[~mask].any()  # the outline stays on the mask


@pytest.mark.parametrize("fast", [False, True])
def test_encode_png_round_trips(fast: bool) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    data = encode_png(array, fast=fast)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), array)


def test_encode_png_rejects_float_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4)))


def test_save_png_writes_file_and_leaves_no_temp_files(tmp_path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "out" / "map.png"
    save_png(path, array)
    save_png(path, array[::-1])  # overwriting works too
    np.testing.assert_array_equal(np.asarray(Image.open(path)), array[::-1])
    assert os.listdir(path.parent) == ["map.png"]
    assert path.stat().st_mode & 0o644 == 0o644  # readable by others, unlike a raw temp file


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path) -> None:
    path = tmp_path / "report.html"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["report.html"]


def test_thumbnail_keeps_aspect_ratio() -> None:
    image = np.zeros((300, 600, 3), dtype=np.uint8)
    small = thumbnail(image, 100)
    assert small.shape == (50, 100, 3) and small.dtype == np.uint8


def test_thumbnail_resizes_float_maps_and_averages_values() -> None:
    anomaly_map = np.tile(np.array([0.0, 1.0]), (40, 20))  # fine stripes, mean 0.5
    small = thumbnail(anomaly_map, 10)
    assert small.shape == (10, 10) and small.dtype == anomaly_map.dtype
    np.testing.assert_allclose(small, 0.5, atol=0.05)


def test_thumbnail_returns_small_arrays_unchanged() -> None:
    image = np.ones((30, 40, 3), dtype=np.uint8)
    assert thumbnail(image, 40) is image
