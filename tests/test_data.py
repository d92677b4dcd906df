"""Tests for normalcy.data: decoding, validation, folder listing and the MVTec layout."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normalcy import datasets
from normalcy.data import (
    ImageLoadError,
    ImageTooLargeError,
    load_image,
    load_image_bytes,
    load_image_bytes_with_size,
    load_image_with_size,
    probe_image,
    reduction_factor,
)
from normalcy.datasets import few_shot_references, find_categories, load_mask
from normalcy.inputs import (
    IMAGE_EXTENSIONS,
    LoadedImage,
    expand_inputs,
    list_images,
    load_many,
    source_name,
)


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- files: every format and mode ends up as uint8 RGB -------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff", ".PNG"])
def test_lossless_rgb_files_round_trip_exactly(tmp_path: Path, suffix: str) -> None:
    pixels = _rgb(5, 7)
    path = _save(Image.fromarray(pixels), tmp_path / f"img{suffix}")
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_jpeg_loads_as_rgb_close_to_original(tmp_path: Path, suffix: str) -> None:
    path = _save(Image.new("RGB", (16, 16), (200, 40, 90)), tmp_path / f"img{suffix}")
    out = load_image(path)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [200, 40, 90]).max() <= 3


def _gray_expected(values: list[int]) -> np.ndarray:
    return np.repeat(np.array(values, dtype=np.uint8)[None, :, None], 3, axis=2)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gray_is_divided_by_257_and_replicated(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / f"deep{suffix}")
    assert Image.open(path).mode.startswith("I;16")
    np.testing.assert_array_equal(load_image(path), _gray_expected([0, 1, 100, 255]))


def test_16bit_scaling_is_fixed_not_per_image_min_max(tmp_path: Path) -> None:
    dark = np.full((2, 2), 257 * 10, dtype=np.uint16)
    dark[0, 0] = 257 * 20
    path = _save(Image.fromarray(dark), tmp_path / "dark.png")
    out = load_image(path)[..., 0]
    np.testing.assert_array_equal(out, [[20, 10], [10, 10]])


def test_mode_i_is_treated_as_16bit_and_clipped(tmp_path: Path) -> None:
    values = np.array([[-5, 257 * 10, 65535, 100_000]], dtype=np.int32)
    path = _save(Image.fromarray(values), tmp_path / "int.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(load_image(path), _gray_expected([0, 10, 255, 255]))


def test_mode_f_is_read_as_unit_range_and_clipped(tmp_path: Path) -> None:
    values = np.array([[-1.0, 0.0, 0.5, 1.0, 3.0]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(load_image(path), _gray_expected([0, 0, 128, 255, 255]))


def test_grayscale_l_is_replicated_to_three_channels(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)), tmp_path / "g.png")
    np.testing.assert_array_equal(load_image(path), _gray_expected([0, 77, 255]))


def test_la_drops_alpha(tmp_path: Path) -> None:
    path = _save(Image.new("LA", (3, 2), (90, 0)), tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    np.testing.assert_array_equal(load_image(path), np.full((2, 3, 3), 90, dtype=np.uint8))


def test_rgba_drops_alpha_without_compositing(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[0, 0, 3] = 255  # the other pixels are fully transparent but keep their colour
    path = _save(Image.fromarray(rgba), tmp_path / "rgba.png")
    assert Image.open(path).mode == "RGBA"
    np.testing.assert_array_equal(load_image(path), np.broadcast_to([10, 20, 30], (2, 2, 3)))


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_palette_is_converted_to_rgb(tmp_path: Path, suffix: str) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / f"pal{suffix}")
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(load_image(path), [[[255, 0, 0], [0, 0, 255]]])


def test_cmyk_is_converted_to_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (2, 2), (0, 255, 0, 0)), tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(load_image(path), np.broadcast_to([255, 0, 255], (2, 2, 3)))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_bilevel_mode_1_maps_to_0_and_255(tmp_path: Path, suffix: str) -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    path = _save(image, tmp_path / f"bw{suffix}")
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(load_image(path), _gray_expected([0, 255]))


def test_loads_content_regardless_of_misleading_extension(tmp_path: Path) -> None:
    pixels = _rgb(3, 3)
    path = tmp_path / "really_a_bmp.png"
    Image.fromarray(pixels).save(path, format="BMP")
    np.testing.assert_array_equal(load_image(path), pixels)


def test_accepts_str_paths(tmp_path: Path) -> None:
    pixels = _rgb(2, 2)
    path = _save(Image.fromarray(pixels), tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(str(path)), pixels)


# --- arrays and PIL images -----------------------------------------------------------------------


def test_uint8_rgb_array_is_returned_as_an_independent_copy() -> None:
    pixels = _rgb(4, 4)
    out = load_image(pixels)
    np.testing.assert_array_equal(out, pixels)
    out[0, 0] = 0
    assert not np.shares_memory(out, pixels)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 1)])
def test_single_channel_arrays_are_replicated(shape: tuple[int, ...]) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(shape)
    out = load_image(gray)
    assert out.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray.reshape(3, 4))


def test_four_channel_array_drops_alpha() -> None:
    rgba = np.dstack([_rgb(3, 3), np.zeros((3, 3), np.uint8)])
    np.testing.assert_array_equal(load_image(rgba), rgba[..., :3])


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_uint16_array_is_divided_by_257(dtype: str) -> None:
    values = np.array([[0, 128, 257 * 50, 65535]], dtype=dtype)
    np.testing.assert_array_equal(load_image(values), _gray_expected([0, 0, 50, 255]))


def test_bool_array_maps_to_0_and_255() -> None:
    np.testing.assert_array_equal(load_image(np.array([[False, True]])), _gray_expected([0, 255]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_array_is_scaled_from_unit_range_and_clipped(dtype: type) -> None:
    values = np.array([[-0.5, 0.0, 0.5, 1.0, 7.0]], dtype=dtype)
    np.testing.assert_array_equal(load_image(values), _gray_expected([0, 0, 128, 255, 255]))


def test_float_array_with_nan_is_rejected() -> None:
    values = np.zeros((2, 2), dtype=np.float32)
    values[1, 1] = np.nan
    with pytest.raises(ImageLoadError, match="NaN") as info:
        load_image(values)
    assert info.value.source == "<array>"


def test_non_contiguous_array_gives_contiguous_output() -> None:
    pixels = _rgb(6, 4)
    view = pixels.transpose(1, 0, 2)[::2]
    out = load_image(view)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, view)


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((3, 3), dtype=np.int32), "dtype"),
        (np.zeros((3, 3, 3), dtype=np.complex64), "dtype"),
        (np.zeros((3, 3, 2), dtype=np.uint8), "shape"),
        (np.zeros((3,), dtype=np.uint8), "shape"),
        (np.zeros((2, 3, 3, 3), dtype=np.uint8), "shape"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero-sized"),
        (np.zeros((5, 0), dtype=np.uint8), "zero-sized"),
    ],
)
def test_unsupported_arrays_are_rejected(array: np.ndarray, problem: str) -> None:
    with pytest.raises(ImageLoadError, match=problem) as info:
        load_image(array)
    assert str(info.value).startswith("<array>: ")


def test_array_over_the_pixel_limit_is_rejected() -> None:
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(np.zeros((10, 10), np.uint8), max_pixels=99)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGB", (2, 2), (1, 2, 3)), [1, 2, 3]),
        (Image.new("RGBA", (2, 2), (1, 2, 3, 0)), [1, 2, 3]),
        (Image.new("L", (2, 2), 9), [9, 9, 9]),
        (Image.fromarray(np.full((2, 2), 65535, np.uint16)), [255, 255, 255]),
        (Image.new("I;16B", (2, 2), 257 * 4), [4, 4, 4]),
        (Image.new("F", (2, 2), 0.2), [51, 51, 51]),
        (Image.new("YCbCr", (2, 2), (255, 128, 128)), [255, 255, 255]),
    ],
)
def test_pil_images_are_converted_like_files(image: Image.Image, expected: list[int]) -> None:
    np.testing.assert_array_equal(load_image(image), np.broadcast_to(expected, (2, 2, 3)))


def test_zero_sized_pil_image_is_rejected() -> None:
    with pytest.raises(ImageLoadError, match="zero-sized") as info:
        load_image(Image.new("RGB", (0, 4)))
    assert info.value.source == "<PIL image>"


def test_unsupported_input_type_is_an_image_load_error() -> None:
    with pytest.raises(ImageLoadError, match="unsupported input type int"):
        load_image(42)  # type: ignore[arg-type]


# --- errors name the file and the problem --------------------------------------------------------


def _noisy_png(path: Path, size: int = 64) -> Path:
    return _save(Image.fromarray(_rgb(size, size)), path)


def test_truncated_png_is_reported_with_its_name(tmp_path: Path) -> None:
    path = _noisy_png(tmp_path / "cut.png")
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(path)
    assert info.value.source == str(path)
    assert "cut.png" in str(info.value)


def test_truncated_jpeg_is_reported_with_its_name(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_rgb(64, 64)), tmp_path / "cut.jpg")
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(path)


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageLoadError, match="not an image") as info:
        load_image(path)
    assert "notes.png" in str(info.value)


def test_empty_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageLoadError, match=r"empty\.png: empty file \(0 bytes\)"):
        load_image(path)


def test_directory_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match="is a directory") as info:
        load_image(folder)
    assert "folder.png" in str(info.value)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ghost.png"
    with pytest.raises(ImageLoadError, match="does not exist") as info:
        load_image(path)
    assert str(info.value) == f"{path}: file does not exist"


def test_unsupported_format_is_reported(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "anim.gif")
    with pytest.raises(ImageLoadError, match="not a supported format"):
        load_image(path)


def test_over_limit_image_reports_size_limit_and_remedy(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (20, 10)), tmp_path / "big.png")
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=199)
    message = str(info.value)
    assert "big.png" in message and "20x10" in message and "199" in message
    assert "max_pixels" in message
    assert load_image(path, max_pixels=200).shape == (10, 20, 3)


def test_size_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    # The pixel data is broken, so only a header-based check can report the size problem.
    path = _noisy_png(tmp_path / "big_and_broken.png")
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ImageLoadError, match="more than the limit"):
        load_image(path, max_pixels=100)


def test_pillow_warning_limit_does_not_preempt_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(Image.new("RGB", (8, 8)), tmp_path / "medium.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 64 pixels: Pillow would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).shape == (8, 8, 3)
    assert Image.MAX_IMAGE_PIXELS == 50


def test_pillow_hard_limit_becomes_image_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 400 > 2 * 50: Pillow raises
    with pytest.raises(ImageLoadError, match="MAX_IMAGE_PIXELS") as info:
        load_image(path)
    assert "bomb.png" in str(info.value)


def test_image_load_error_fields_and_pickling() -> None:
    err = ImageLoadError("a/b.png", "broken")
    assert isinstance(err, ValueError)
    assert (err.source, err.reason, str(err)) == ("a/b.png", "broken", "a/b.png: broken")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.source, copy.reason, str(copy)) == ("a/b.png", "broken", "a/b.png: broken")


# --- load_many and source_name -------------------------------------------------------------------


def test_load_many_yields_errors_in_place_and_continues(tmp_path: Path) -> None:
    good = _save(Image.fromarray(_rgb(3, 3)), tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    array = np.zeros((2, 2), np.uint8)
    results = list(load_many([good, broken, array, tmp_path / "missing.png"]))
    assert len(results) == 4
    assert isinstance(results[0], LoadedImage) and results[0].name == str(good)
    assert isinstance(results[1], ImageLoadError) and results[1].source == str(broken)
    assert isinstance(results[2], LoadedImage) and results[2].name == "<image 2>"
    assert results[2].image.shape == (2, 2, 3)
    assert isinstance(results[3], ImageLoadError) and "does not exist" in results[3].reason


def test_load_many_names_in_memory_errors_by_index() -> None:
    (result,) = load_many([np.zeros((2, 2), np.int64)])
    assert isinstance(result, ImageLoadError) and result.source == "<image 0>"


def test_load_many_applies_max_pixels() -> None:
    (result,) = load_many([np.zeros((4, 4), np.uint8)], max_pixels=10)
    assert isinstance(result, ImageLoadError)


def test_source_name(tmp_path: Path) -> None:
    assert source_name(tmp_path / "x.png", 3) == str(tmp_path / "x.png")
    assert source_name("rel/x.png", 3) == "rel/x.png"
    assert source_name(np.zeros((1, 1)), 3) == "<image 3>"
    assert source_name(Image.new("RGB", (1, 1)), 0) == "<image 0>"


# --- reduced decoding for a consumer that needs far fewer pixels (min_side) ----------------------


def _smooth(h: int, w: int) -> np.ndarray:
    """A smooth colour image: JPEG keeps it well and box-downscaling barely changes it."""
    y, x = np.mgrid[0:h, 0:w]
    red = 128 + 100 * np.sin(x / 40)
    green = 128 + 100 * np.cos(y / 30)
    blue = (x + y) * 255 / (h + w)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _box(image: np.ndarray, factor: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).reduce(factor))


def _mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize(
    ("height", "width", "min_side", "factor"),
    [
        (800, 1000, 100, 4),
        (1000, 800, 100, 4),
        (799, 1000, 100, 3),
        (1200, 1600, 100, 6),
        (399, 399, 200, 1),  # short side under 2 * min_side: no reduction
        (10, 10, 100, 1),
        (4000, 3000, None, 1),
    ],
)
def test_reduction_factor_keeps_twice_min_side(
    height: int, width: int, min_side: int | None, factor: int
) -> None:
    assert reduction_factor(height, width, min_side) == factor
    if min_side is not None and factor > 1:
        assert min(height, width) // factor >= 2 * min_side


def test_min_side_must_be_positive(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_rgb(4, 4)), tmp_path / "a.png")
    with pytest.raises(ValueError, match="min_side"):
        reduction_factor(10, 10, 0)
    with pytest.raises(ValueError, match="min_side"):
        load_image(path, min_side=0)
    with pytest.raises(ValueError, match="min_side"):
        load_image_bytes(path.read_bytes(), "a.png", min_side=-1)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_min_side_none_changes_nothing(tmp_path: Path, suffix: str) -> None:
    path = _save(Image.fromarray(_smooth(600, 500)), tmp_path / f"big{suffix}")
    with Image.open(path) as image:
        full = np.asarray(image.convert("RGB"))
    for out in (
        load_image(path),
        load_image(path, min_side=None),
        load_image_bytes(path.read_bytes(), "big", min_side=None),
        load_image_with_size(path)[0],
    ):
        assert out.flags.c_contiguous and out.flags.writeable
        np.testing.assert_array_equal(out, full)
    assert load_image_with_size(path)[1] == (600, 500)


def test_large_png_is_box_reduced_and_reports_its_original_size(tmp_path: Path) -> None:
    pixels = _smooth(800, 1000)
    path = _save(Image.fromarray(pixels), tmp_path / "large.png")
    out, size = load_image_with_size(path, min_side=100)
    assert size == (800, 1000)
    assert out.shape == (200, 250, 3) and out.dtype == np.uint8  # 800 // 200 = 4
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, _box(pixels, 4))
    bytes_out, bytes_size = load_image_bytes_with_size(path.read_bytes(), "x", min_side=100)
    np.testing.assert_array_equal(bytes_out, out)
    assert bytes_size == size


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_smooth(1200, 1600)), tmp_path / "large.jpg")
    out, size = load_image_with_size(path, min_side=100)
    assert size == (1200, 1600)
    # reduction_factor is 6; the JPEG decoder scales by 1/4 (the largest power of two <= 6),
    # giving a short side of 300, which needs no further box filter (300 < 4 * 100). A box
    # filter alone would have given 1200 // 6 = 200.
    assert out.shape == (300, 400, 3) and out.dtype == np.uint8
    assert 2 * 100 <= min(out.shape[:2]) < 4 * 100
    assert _mean_abs_difference(out, _box(load_image(path), 4)) < 2.0


def test_jpeg_draft_then_box_filter_for_the_remaining_factor(tmp_path: Path) -> None:
    # reduction_factor 1600 // 40 = 40: the decoder scales by 1/8 (200 x 250), then the
    # remaining factor 200 // 40 = 5 is box-filtered.
    path = _save(Image.fromarray(_smooth(1600, 2000)), tmp_path / "huge.jpg")
    out, size = load_image_with_size(path, min_side=20)
    assert size == (1600, 2000)
    assert out.shape == (40, 50, 3)
    expected = _box(_box(load_image(path), 8), 5)
    assert _mean_abs_difference(out, expected) < 2.0


@pytest.mark.parametrize(
    ("mode", "suffix"), [("L", ".png"), ("L", ".jpg"), ("CMYK", ".jpg"), ("RGBA", ".png")]
)
def test_reduced_images_stay_uint8_rgb_in_every_mode(
    tmp_path: Path, mode: str, suffix: str
) -> None:
    path = _save(Image.fromarray(_smooth(800, 800)).convert(mode), tmp_path / f"img{suffix}")
    out, size = load_image_with_size(path, min_side=100)
    assert size == (800, 800)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert 200 <= out.shape[0] < 400 and out.shape[0] == out.shape[1]
    assert _mean_abs_difference(out, _box(load_image(path), 800 // out.shape[0])) < 2.0
    if mode == "L":
        assert (out == out[..., :1]).all()  # still grey


def test_small_image_is_returned_at_full_size(tmp_path: Path) -> None:
    pixels = _rgb(199, 300)  # short side under 2 * 100
    path = _save(Image.fromarray(pixels), tmp_path / "small.png")
    out, size = load_image_with_size(path, min_side=100)
    assert size == (199, 300)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_pixel_limit_uses_the_original_size_with_min_side(tmp_path: Path, suffix: str) -> None:
    path = _save(Image.fromarray(_smooth(800, 1000)), tmp_path / f"big{suffix}")
    with pytest.raises(ImageTooLargeError, match="1000x800"):
        load_image(path, max_pixels=800 * 1000 - 1, min_side=100)
    with pytest.raises(ImageTooLargeError):
        load_image_bytes(path.read_bytes(), "big", max_pixels=800 * 1000 - 1, min_side=100)
    (result,) = load_many([path], max_pixels=800 * 1000 - 1, min_side=100)
    assert isinstance(result, ImageTooLargeError)
    assert load_image(path, max_pixels=800 * 1000, min_side=100).shape[:2] == (200, 250)


def test_arrays_and_pil_images_are_reduced_too() -> None:
    pixels = _smooth(800, 1000)
    for source in (pixels, Image.fromarray(pixels)):
        out, size = load_image_with_size(source, min_side=100)
        assert size == (800, 1000)
        np.testing.assert_array_equal(out, _box(pixels, 4))
    gray16 = (_smooth(800, 1000)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    out = load_image(gray16, min_side=100)
    assert out.shape == (200, 250, 3)
    np.testing.assert_array_equal(out[..., 0], _box(pixels[..., 0], 4))


def test_pil_image_given_by_the_caller_is_not_drafted(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_smooth(1200, 1600)), tmp_path / "large.jpg")
    with Image.open(path) as image:
        out, size = load_image_with_size(image, min_side=100)
        assert image.size == (1600, 1200)
    assert size == (1200, 1600) and out.shape == (200, 267, 3)  # box filter by 6 only


def test_load_many_with_min_side_keeps_the_original_size(tmp_path: Path) -> None:
    png = _save(Image.fromarray(_smooth(800, 1000)), tmp_path / "a.png")
    jpg = _save(Image.fromarray(_smooth(1200, 1600)), tmp_path / "b.jpg")
    small = np.zeros((10, 12), np.uint8)
    results = list(load_many([png, jpg, small, tmp_path / "missing.png"], min_side=100))
    assert all(isinstance(r, LoadedImage) for r in results[:3])
    assert [r.size for r in results[:3]] == [(800, 1000), (1200, 1600), (10, 12)]
    assert [r.image.shape for r in results[:3]] == [(200, 250, 3), (300, 400, 3), (10, 12, 3)]
    assert isinstance(results[3], ImageLoadError)
    without = list(load_many([png]))[0]
    assert isinstance(without, LoadedImage) and without.size == without.image.shape[:2]


def test_loaded_image_size_defaults_to_the_image_shape() -> None:
    image = np.zeros((5, 7, 3), np.uint8)
    loaded = LoadedImage("a", image)
    assert loaded.size == (5, 7) and loaded.image is image
    assert LoadedImage("b", image, (50, 70)).size == (50, 70)
    with pytest.raises(AttributeError):
        loaded.size = (1, 1)  # type: ignore[misc]


# --- list_images and expand_inputs ---------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for rel in [
        "b.png",
        "A.JPG",
        "c.TiFf",
        "sub/d.bmp",
        "sub/deeper/e.jpeg",
        ".hidden.png",
        ".cache/f.png",
        "sub/.git/g.png",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    (root / "dir.png").mkdir()
    return root


def test_image_extensions() -> None:
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert sorted(IMAGE_EXTENSIONS) == [".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff"]


def test_list_images_recursive_sorted_skips_hidden(image_tree: Path) -> None:
    found = list_images(image_tree)
    rel = [p.relative_to(image_tree).as_posix() for p in found]
    assert rel == ["A.JPG", "b.png", "c.TiFf", "sub/d.bmp", "sub/deeper/e.jpeg"]
    assert found == sorted(found)


def test_list_images_non_recursive(image_tree: Path) -> None:
    rel = [p.name for p in list_images(str(image_tree), recursive=False)]
    assert rel == ["A.JPG", "b.png", "c.TiFf"]


def test_list_images_works_inside_a_hidden_parent(tmp_path: Path) -> None:
    folder = tmp_path / ".work" / "imgs"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"x")
    assert list_images(folder) == [folder / "a.png"]


def test_list_images_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    file = tmp_path / "file.png"
    file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="file.png"):
        list_images(file)


def test_expand_single_inputs(image_tree: Path) -> None:
    array = np.zeros((4, 4, 3), np.uint8)
    image = Image.new("RGB", (2, 2))
    assert expand_inputs(str(image_tree / "b.png")) == [str(image_tree / "b.png")]
    assert expand_inputs(image_tree) == list_images(image_tree)
    assert expand_inputs(array)[0] is array
    assert expand_inputs(image) == [image]


def test_expand_mixed_sequence_keeps_order(image_tree: Path, tmp_path: Path) -> None:
    array = np.zeros((4, 4), np.uint8)
    missing = tmp_path / "missing.png"
    out = expand_inputs([array, image_tree / "sub", missing, "x.png"])
    assert out[0] is array
    assert out[1:3] == [image_tree / "sub" / "d.bmp", image_tree / "sub" / "deeper" / "e.jpeg"]
    assert out[3:] == [missing, "x.png"]


def test_expand_4d_array_is_a_batch() -> None:
    batch = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    out = expand_inputs(batch)
    assert len(out) == 2
    np.testing.assert_array_equal(out[1], batch[1])
    assert len(expand_inputs([batch, batch[0]])) == 3


def test_expand_empty_folder_names_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="empty_dir.*no images"):
        expand_inputs([empty])


def test_expand_rejects_non_sequences() -> None:
    with pytest.raises(TypeError, match="unsupported input type"):
        expand_inputs(42)  # type: ignore[arg-type]


# --- MVTec layout --------------------------------------------------------------------------------


def _make_category(
    root: Path,
    defects: dict[str, int],
    n_train: int = 3,
    n_good: int = 2,
    masks: bool = True,
) -> Path:
    tiny = Image.new("L", (4, 4), 0)
    for i in range(n_train):
        _save(tiny, root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        _save(tiny, root / "test" / "good" / f"{i:03d}.png")
    for defect, count in defects.items():
        for i in range(count):
            _save(tiny, root / "test" / defect / f"{i:03d}.png")
            if masks:
                _save(tiny, root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def test_find_categories_in_a_dataset_root(tmp_path: Path) -> None:
    _make_category(tmp_path / "screw", {"scratch": 2, "bent": 1})
    _make_category(tmp_path / "bottle", {"crack": 1}, masks=False)
    (tmp_path / "not_a_category").mkdir()
    (tmp_path / "README.txt").write_text("readme")

    bottle, screw = find_categories(tmp_path)
    assert (bottle.name, screw.name) == ("bottle", "screw")
    assert screw.root == tmp_path / "screw"
    assert screw.has_masks and not bottle.has_masks
    assert [p.name for p in screw.train] == ["000.png", "001.png", "002.png"]
    assert [(s.defect, s.path.name, s.label) for s in screw.test] == [
        ("good", "000.png", 0),
        ("good", "001.png", 0),
        ("bent", "000.png", 1),
        ("scratch", "000.png", 1),
        ("scratch", "001.png", 1),
    ]
    good, bent = screw.test[0], screw.test[2]
    assert good.mask_path is None
    assert bent.mask_path == tmp_path / "screw" / "ground_truth" / "bent" / "000_mask.png"
    assert all(s.mask_path is None for s in bottle.test)


def test_find_categories_when_root_is_one_category(tmp_path: Path) -> None:
    root = _make_category(tmp_path / "carpet", {"hole": 1})
    (category,) = find_categories(root)
    assert category.name == "carpet" and category.root == root
    assert len(category.train) == 3 and len(category.test) == 3


def test_find_categories_filters_by_name(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _make_category(tmp_path / name, {"x": 1})
    assert [c.name for c in find_categories(tmp_path, ["c", "a"])] == ["a", "c"]
    assert [c.name for c in find_categories(tmp_path, "b")] == ["b"]


def test_unknown_category_lists_available_ones(tmp_path: Path) -> None:
    _make_category(tmp_path / "bottle", {"x": 1})
    _make_category(tmp_path / "cable", {"x": 1})
    with pytest.raises(ValueError, match="wood") as info:
        find_categories(tmp_path, ["wood"])
    assert "available: bottle, cable" in str(info.value)


def test_missing_mask_names_the_expected_file(tmp_path: Path) -> None:
    root = _make_category(tmp_path / "tile", {"crack": 2})
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match="001_mask.png"):
        find_categories(tmp_path)


def test_missing_root_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        find_categories(tmp_path / "nope")


def test_root_without_categories_explains_the_layout(tmp_path: Path) -> None:
    (tmp_path / "random" / "stuff").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/good"):
        find_categories(tmp_path)


def test_category_without_training_images_is_reported(tmp_path: Path) -> None:
    _make_category(tmp_path / "grid", {"x": 1}, n_train=0)
    (tmp_path / "grid" / "train" / "good").mkdir(parents=True, exist_ok=True)
    with pytest.raises(ValueError, match="no training images"):
        find_categories(tmp_path)


def test_category_without_test_images_is_reported(tmp_path: Path) -> None:
    _make_category(tmp_path / "grid", {}, n_good=0)
    with pytest.raises(ValueError, match="test"):
        find_categories(tmp_path)
    (tmp_path / "grid" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no test images"):
        find_categories(tmp_path)


def test_test_sample_is_not_collected_by_pytest() -> None:
    assert datasets.TestSample.__test__ is False


def test_load_mask_thresholds_at_127(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)), tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(path, (1, 4)), [[False, False, True, True]])


def test_load_mask_uses_first_channel(tmp_path: Path) -> None:
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 0, 0] = 255
    rgb[0, 1, 1:] = 255
    path = _save(Image.fromarray(rgb), tmp_path / "rgb_mask.png")
    mask = load_mask(path, (1, 2))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, [[True, False]])


def test_load_mask_size_mismatch_names_the_file(tmp_path: Path) -> None:
    path = _save(Image.new("L", (4, 3)), tmp_path / "small_mask.png")
    with pytest.raises(ValueError, match="small_mask.png"):
        load_mask(path, (4, 3))


def test_load_mask_unreadable_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad_mask.png"
    path.write_text("nope")
    with pytest.raises(ValueError, match="bad_mask.png"):
        load_mask(path, (4, 4))


# --- few-shot reference protocol -----------------------------------------------------------------


def test_few_shot_references_take_consecutive_sorted_slices() -> None:
    paths = [Path(f"{i:02d}.png") for i in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)]
    ordered = sorted(paths)
    assert few_shot_references(paths, 3) == ordered[0:3]
    assert few_shot_references(paths, 3, seed=1) == ordered[3:6]
    assert few_shot_references(paths, 3, seed=2) == ordered[6:9]
    assert few_shot_references(paths, 10) == ordered


def test_few_shot_references_errors() -> None:
    paths = [Path(f"{i}.png") for i in range(10)]
    with pytest.raises(ValueError, match=r"12 are needed.*only 10 exist"):
        few_shot_references(paths, 3, seed=3)
    with pytest.raises(ValueError, match="at least 1"):
        few_shot_references(paths, 0)
    with pytest.raises(ValueError, match="seed"):
        few_shot_references(paths, 1, seed=-1)


def test_probe_image_reads_headers_only_and_names_what_would_fail(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (30, 20)), tmp_path / "good.png")
    assert probe_image(good) is None
    assert probe_image(np.zeros((4, 4, 3), np.uint8)) is None
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, reason in [
        (text, "not a readable image"),
        (empty, "empty file"),
        (tmp_path / "missing.png", "does not exist"),
        (tmp_path, "is a directory"),
    ]:
        error = probe_image(path)
        assert isinstance(error, ImageLoadError) and reason in str(error)
        assert str(path) in str(error)
    assert isinstance(probe_image(good, max_pixels=100), ImageTooLargeError)
