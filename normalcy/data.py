"""Decoding and validating images.

Every image that enters normalcy goes through :func:`load_image`, which returns one canonical
form (uint8 RGB, shape (H, W, 3), C-contiguous) whatever the file format, bit depth or array
dtype. Problems are reported as :class:`ImageLoadError`, whose message names the image and the
problem, so a batch job can report a bad file and carry on with the rest. Which images a call
names, and decoding them ahead of the network: `inputs`; data sets on disk: `datasets`.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, TypeAlias

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 80_000_000
"""Default limit on width * height, a guard against decompression bombs and runaway memory."""


ImageInput: TypeAlias = str | os.PathLike | np.ndarray | Image.Image
"""Anything :func:`load_image` accepts: a file path, a numpy array or a PIL image."""


# Pillow decoders tried on files; the formats behind `inputs.IMAGE_EXTENSIONS`. Restricting the
# list keeps exotic plugins (some of which run external programs) away from untrusted files.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_ARRAY_NAME = "<array>"
_PIL_NAME = "<PIL image>"
_UINT16_TO_UINT8 = 257  # 65535 / 255: maps the full 16-bit range onto the full 8-bit range
BAND_PIXELS = 4_000_000  # pixels converted at a time when an array becomes RGB


class ImageLoadError(ValueError):
    """An image could not be loaded; ``source`` names it and ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(source, reason)  # both in args, so the error survives pickling
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than allowed (a decompression bomb, or simply too big)."""


def reduction_factor(height: int, width: int, min_side: int | None) -> int:
    """The integer factor by which an image may shrink when it will be resized to ``min_side``.

    The caller will resize the image so its short side is ``min_side``; decoding more than about
    twice that is wasted work. The factor is ``short_side // (2 * min_side)``, at least 1, so the
    reduced image keeps a short side of at least ``2 * min_side`` (enough for an antialiased
    resize to stay faithful). 1, also the answer for ``min_side=None``, means no reduction.
    """
    if min_side is None:
        return 1
    _check_min_side(min_side)
    return max(1, min(height, width) // (2 * min_side))


def _check_min_side(min_side: int | None) -> None:
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be a positive number of pixels or None, got {min_side}")


def load_image(
    source: ImageInput, max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> np.ndarray:
    """Load a path, array or PIL image as a uint8 RGB array of shape (H, W, 3).

    16-bit data is divided by 257 and floats are read as [0, 1], the same for every image so
    intensities stay comparable between images. Alpha is dropped, grayscale is replicated to
    three channels. Images with more than ``max_pixels`` pixels are refused before decoding.
    Every failure raises :class:`ImageLoadError` naming the source.

    ``min_side`` says the caller will resize the image so its short side is ``min_side``: a
    large image then comes back smaller, by :func:`reduction_factor` (JPEGs are decoded at
    reduced scale, anything else is box-filtered), which saves most of the decode and resize
    time. :func:`load_image_with_size` also returns the original size.
    """
    return load_image_with_size(source, max_pixels, min_side)[0]


def load_image_with_size(
    source: ImageInput, max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`load_image`, and also the original (height, width) before any reduction."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fsdecode(source)
    elif isinstance(source, np.ndarray):
        name = _ARRAY_NAME
    else:
        name = _PIL_NAME
    return load_named(source, name, max_pixels, min_side)


def load_named(
    source: ImageInput, name: str, max_pixels: int, min_side: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The one loading path, for `source` reported as `name`: the RGB image (reduced for
    ``min_side``) and its original size."""
    _check_min_side(min_side)
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(os.fsdecode(source)), name, max_pixels, min_side)
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, name, max_pixels, min_side)
        height, width = source.shape[:2]
        return rgb, (height, width)
    if isinstance(source, Image.Image):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # The caller's image is never drafted: that would change it in place.
            return _decode_pil(source, name, max_pixels, min_side, draft=False)
    raise ImageLoadError(
        name,
        f"unsupported input type {type(source).__name__}; "
        "expected a file path, a numpy array or a PIL image",
    )


def _load_file(
    path: Path, name: str, max_pixels: int, min_side: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(name, "file does not exist") from None
    except OSError as exc:
        raise ImageLoadError(name, f"cannot access file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(name, "is a directory, not an image file")
    if info.st_size == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _decode_stream(path, name, max_pixels, min_side)


def header_size(source: Path | BinaryIO) -> tuple[int, int]:
    """(height, width) from an image file's header, nothing decoded (Pillow's errors pass)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source, formats=PIL_FORMATS) as image:
            return image.height, image.width


def probe_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> ImageLoadError | None:
    """None when `source` looks loadable from its header alone (a supported image within
    `max_pixels`), else the error loading it would give; cheap: nothing is decoded. Arrays
    and PIL images are taken as they are."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(os.fsdecode(source))
    name = os.fsdecode(source)
    try:
        if path.is_dir():
            raise ImageLoadError(name, "is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
        _check_size(name, *header_size(path), max_pixels)
    except ImageLoadError as error:
        return error
    except FileNotFoundError:
        return ImageLoadError(name, "file does not exist")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        return ImageLoadError(name, f"not a readable image ({_describe(exc)})")
    return None


def load_image_bytes(
    data: bytes, name: str, max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> np.ndarray:
    """Decode an encoded image (an upload, say) as uint8 RGB, like `load_image`.

    The format is recognised from the content, never from `name`, which only labels errors.
    """
    return load_image_bytes_with_size(data, name, max_pixels, min_side)[0]


def load_image_bytes_with_size(
    data: bytes, name: str, max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`load_image_bytes`, and also the original (height, width) before reduction."""
    _check_min_side(min_side)
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _decode_stream(io.BytesIO(data), name, max_pixels, min_side)


def _decode_stream(
    source: Path | BinaryIO, name: str, max_pixels: int, min_side: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    # Pillow warns (and above twice its limit, raises) on large images as soon as it reads the
    # header. The warning is silenced here, for this call only, so that our own max_pixels check,
    # which runs right after the header is read, decides instead; Image.MAX_IMAGE_PIXELS is left
    # untouched for other code.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source, formats=PIL_FORMATS)
        except UnidentifiedImageError:
            raise ImageLoadError(
                name,
                "not an image file, or not a supported format "
                f"(supported: {', '.join(PIL_FORMATS)})",
            ) from None
        except Image.DecompressionBombError as exc:
            raise _pil_limit_error(name, exc) from None
        except Exception as exc:
            raise ImageLoadError(name, f"cannot read image header ({_describe(exc)})") from None
        with image:
            return _decode_pil(image, name, max_pixels, min_side, draft=True)


def _decode_pil(
    image: Image.Image, name: str, max_pixels: int, min_side: int | None, draft: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """Check the size from the header, then fully decode and convert a PIL image.

    Returns the RGB array, reduced for ``min_side``, and the original (height, width). With
    ``draft``, a JPEG is decoded directly at 1/2, 1/4 or 1/8 scale when ``min_side`` allows.
    """
    width, height = image.size
    _check_size(name, height, width, max_pixels)  # the original size, before any draft
    factor = reduction_factor(height, width, min_side)
    try:
        if draft and factor > 1 and image.format == "JPEG":
            # The JPEG decoder picks the largest DCT scaling that keeps at least this size.
            image.draft(image.mode, (width // factor, height // factor))
        # Forces a full decode, so truncated or corrupt data fails here rather than later.
        image.load()
        array = _pil_to_array(_reduced_pil(image, min_side))
    except Image.DecompressionBombError as exc:
        raise _pil_limit_error(name, exc) from None
    except _UnsupportedModeError:
        raise ImageLoadError(name, f"unsupported image mode {image.mode!r}") from None
    except Exception as exc:
        raise ImageLoadError(name, f"corrupt or truncated image data ({_describe(exc)})") from None
    return _array_to_rgb(array, name, max_pixels, min_side), (height, width)


class _UnsupportedModeError(Exception):
    pass


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """Turn a decoded PIL image into an array that :func:`_array_to_rgb` understands."""
    mode = image.mode
    if mode in ("1", "L", "RGB", "RGBA", "RGBX", "I", "F") or mode.startswith("I;16"):
        array = np.asarray(image)
    elif mode == "LA":
        array = np.asarray(image)[..., 0]
    else:  # palette, CMYK, YCbCr, LAB, HSV, premultiplied alpha, ...
        try:
            array = np.asarray(image.convert("RGB"))
        except ValueError:
            raise _UnsupportedModeError from None
    if array.dtype.kind == "i":
        # 32-bit integer images (mode "I", e.g. some 16-bit PNGs) are read as 16-bit values.
        array = np.clip(array, 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return array


def _array_to_rgb(
    array: np.ndarray, name: str, max_pixels: int, min_side: int | None
) -> np.ndarray:
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ImageLoadError(
            name,
            f"unsupported array shape {array.shape}; "
            "expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)",
        )
    height, width = array.shape[:2]
    _check_size(name, height, width, max_pixels)

    kind, itemsize = array.dtype.kind, array.dtype.itemsize
    if not (kind in "bf" or (kind == "u" and itemsize in (1, 2))):
        raise ImageLoadError(
            name,
            f"unsupported array dtype {array.dtype}; "
            "expected uint8, uint16, bool or float with values in [0, 1]",
        )
    if kind == "f" and np.isnan(array).any():
        raise ImageLoadError(name, "float image contains NaN values")
    # Converted and reduced a band of rows at a time, so no full-size temporary of another
    # dtype or of three channels is made (a 16-bit 80-megapixel image would need gigabytes).
    factor = reduction_factor(height, width, min_side)
    rgb = np.empty((-(-height // factor), -(-width // factor), 3), dtype=np.uint8)
    step = factor * max(1, BAND_PIXELS // (factor * width))
    for start in range(0, height, step):
        band = _as_uint8(array[start : start + step])
        if band.ndim == 2:
            band = band[..., None]
        band_rgb = np.empty((*band.shape[:2], 3), dtype=np.uint8)
        band_rgb[...] = band[..., :3]  # drops alpha; a single channel broadcasts to three
        if factor > 1:
            band_rgb = np.asarray(Image.fromarray(band_rgb).reduce(factor))
        rgb[start // factor : start // factor + len(band_rgb)] = band_rgb
    return rgb


def _as_uint8(values: np.ndarray) -> np.ndarray:
    """bool, uint8, uint16 or [0, 1] float values as uint8 (16-bit divided by 257)."""
    kind, itemsize = values.dtype.kind, values.dtype.itemsize
    if kind == "b":
        return values.astype(np.uint8) * np.uint8(255)
    if kind == "u" and itemsize == 1:
        return values
    if kind == "u":
        rounded = (values.astype(np.uint32) + _UINT16_TO_UINT8 // 2) // _UINT16_TO_UINT8
        return rounded.astype(np.uint8)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _reduced_pil(image: Image.Image, min_side: int | None) -> Image.Image:
    """A decoded PIL image box-filtered by :func:`reduction_factor` before it becomes an array,
    so no full-size copy is made; modes Pillow cannot reduce are reduced as arrays."""
    factor = reduction_factor(image.height, image.width, min_side)
    if factor == 1:
        return image
    try:
        return image.reduce(factor)
    except ValueError:
        return image


def _check_size(name: str, height: int, width: int, max_pixels: int) -> None:
    if height == 0 or width == 0:
        raise ImageLoadError(name, f"zero-sized image ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} pixels; pass a larger max_pixels to load it",
        )


def _pil_limit_error(name: str, exc: Image.DecompressionBombError) -> ImageLoadError:
    return ImageTooLargeError(
        name,
        f"image exceeds Pillow's decompression-bomb limit ({str(exc).rstrip('.')}); to load it, "
        "raise PIL.Image.MAX_IMAGE_PIXELS and, if needed, pass a larger max_pixels",
    )


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
