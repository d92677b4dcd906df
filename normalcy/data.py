"""Finding, decoding and validating images, and reading the MVTec AD folder layout.

Every image that enters normalcy goes through :func:`load_image`, which returns one canonical
form (uint8 RGB, shape (H, W, 3), C-contiguous) whatever the file format, bit depth or array
dtype. Problems are reported as :class:`ImageLoadError`, whose message names the image and the
problem, so a batch job can report a bad file and carry on with the rest.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeAlias

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""File extensions treated as images when listing folders (compared in lower case)."""

MAX_PIXELS = 80_000_000
"""Default limit on width * height, a guard against decompression bombs and runaway memory."""

ImageInput: TypeAlias = str | os.PathLike | np.ndarray | Image.Image
"""Anything :func:`load_image` accepts: a file path, a numpy array or a PIL image."""

# Pillow decoders tried on files; the formats behind IMAGE_EXTENSIONS. Restricting the list keeps
# exotic plugins (some of which run external programs) away from untrusted files.
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


def source_name(source: ImageInput, index: int) -> str:
    """Name an input for reports: the path for files, ``<image INDEX>`` for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    return f"<image {index}>"


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
    return _load(source, name, max_pixels, min_side)


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """One successfully loaded image, the name to report it under and its original size.

    ``size`` is the (height, width) of the image before any reduction (see ``min_side`` in
    :func:`load_image`), the size at which full-resolution maps are drawn; it defaults to the
    size of ``image``.
    """

    name: str
    image: np.ndarray
    size: tuple[int, int] = None  # type: ignore[assignment]  # set by __post_init__

    def __post_init__(self) -> None:
        if self.size is None:
            height, width = self.image.shape[:2]
            object.__setattr__(self, "size", (height, width))


def load_many(
    sources: Sequence[ImageInput], max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> Iterator[LoadedImage | ImageLoadError]:
    """Load images one at a time, in order, yielding either the image or its error.

    A bad image is yielded as its :class:`ImageLoadError` (never raised, never dropped) so the
    caller can report it and go on with the rest. ``min_side`` reduces large images as in
    :func:`load_image`; each :class:`LoadedImage` keeps its original size.
    """
    for index, source in enumerate(sources):
        yield load_one(source, index, max_pixels, min_side)


def load_one(
    source: ImageInput, index: int, max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> LoadedImage | ImageLoadError:
    """The `index`-th input of a batch, loaded as in :func:`load_many`: the image or its error."""
    name = source_name(source, index)
    try:
        image, size = _load(source, name, max_pixels, min_side)
        return LoadedImage(name=name, image=image, size=size)
    except ImageLoadError as err:
        return err


PREFETCH = 4  # decoded images kept ready ahead of the consumer, per decoding thread


def decode_threads() -> int:
    """Threads that decode ahead of the network: a quarter of the cores, at least one (the
    network keeps the others); enough to keep a GPU fed from a many-core host."""
    return max(1, (os.cpu_count() or 1) // 4)


def decoded_ahead(
    sources: Sequence[ImageInput], min_side: int | None, threads: int | None = None
) -> Iterator[LoadedImage | ImageLoadError]:
    """`load_many(sources, min_side=...)`, in order, decoded by `threads` threads (default
    `decode_threads()`) up to `PREFETCH` images each ahead of the consumer, so decoding
    overlaps the forward pass (decoders and the network's engine release the GIL); an image
    that cannot be read comes as its error, in its place. Abandoning the stream cancels the
    rest."""
    threads = threads or decode_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="normalcy-decode") as pool:
        pending: deque[Future] = deque()
        try:
            for index, source in enumerate(sources):
                pending.append(pool.submit(load_one, source, index, MAX_PIXELS, min_side))
                if len(pending) >= threads * PREFETCH:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _load(
    source: ImageInput, name: str, max_pixels: int, min_side: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The one loading path: the RGB image (reduced for ``min_side``) and its original size."""
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


def _is_image_file_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """List the image files in a folder by extension, sorted by path.

    Hidden files and hidden folders (names starting with ".") are skipped.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    if not recursive:
        return sorted(p for p in root.iterdir() if p.is_file() and _is_image_file_name(p.name))
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if _is_image_file_name(f))
    return sorted(found)


def is_single_input(inputs: ImageInput | Sequence[ImageInput]) -> bool:
    """Whether `inputs` is one image (not a list, a 4-D array or a folder): `predict` then
    returns one prediction instead of a list."""
    return (
        not isinstance(inputs, (list, tuple))
        and not (isinstance(inputs, np.ndarray) and inputs.ndim == 4)
        and not (isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir())
    )


def expand_inputs(inputs: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """Flatten user inputs into a list of single images.

    Accepts one input or a sequence of them. Folders expand to the images they hold, a 4-D
    array (N, H, W, C) to its N images; files, other arrays and PIL images pass through, and so
    does a path that does not exist, so that loading it reports the problem.
    """
    if isinstance(inputs, (str, os.PathLike, np.ndarray, Image.Image)):
        items: Sequence[ImageInput] = [inputs]
    elif isinstance(inputs, Sequence):
        items = inputs
    else:
        raise TypeError(
            f"unsupported input type {type(inputs).__name__}; expected a path, an array, "
            "a PIL image or a sequence of them"
        )
    expanded: list[ImageInput] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            images = list_images(item)
            if not images:
                extensions = " ".join(sorted(IMAGE_EXTENSIONS))
                raise ValueError(
                    f"{os.fsdecode(item)}: folder holds no images (looked for {extensions})"
                )
            expanded.extend(images)
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            expanded.extend(item)
        else:
            expanded.append(item)
    return expanded


@dataclass(frozen=True)
class TestSample:
    """One MVTec test image with its label and, for defects, its ground-truth mask file."""

    __test__ = False  # not a pytest test class, despite the name

    path: Path
    label: int  # 0 good, 1 defect
    defect: str  # "good" or the defect folder name
    mask_path: Path | None


@dataclass(frozen=True)
class MVTecCategory:
    """One MVTec AD category: its training images (all good) and labelled test images."""

    name: str
    root: Path
    train: list[Path]
    test: list[TestSample]
    has_masks: bool  # True when the category has a ground_truth folder


_LAYOUT = (
    "expected <root>/<category>/train/good/ (or <root>/train/good/ when the root is a single "
    "category), with test/good/, test/<defect>/ and optionally ground_truth/<defect>/"
)


def find_categories(
    root: str | os.PathLike, names: Sequence[str] | None = None
) -> list[MVTecCategory]:
    """Find the MVTec AD categories under ``root`` (or ``root`` itself), sorted by name.

    A category is a folder with train/good. ``names`` restricts the result to those categories.
    Raises FileNotFoundError or ValueError with the offending path when the layout is broken.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset root does not exist or is not a folder: {base}")
    if (base / "train" / "good").is_dir():
        folders = [base]
    else:
        folders = sorted(
            d
            for d in base.iterdir()
            if d.is_dir() and not d.name.startswith(".") and (d / "train" / "good").is_dir()
        )
    if not folders:
        raise ValueError(f"no MVTec AD category found in {base}: {_LAYOUT}")

    if names is not None:
        if isinstance(names, str):
            names = [names]
        available = [d.name for d in folders]
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(
                f"categor{'y' if len(missing) == 1 else 'ies'} not found in {base}: "
                f"{', '.join(missing)}; available: {', '.join(available)}"
            )
        folders = [d for d in folders if d.name in names]
    return [_read_category(d) for d in folders]


def _read_category(folder: Path) -> MVTecCategory:
    train_dir = folder / "train" / "good"
    train = list_images(train_dir, recursive=False)
    if not train:
        raise ValueError(f"{train_dir}: no training images")

    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise ValueError(f"{folder}: missing test folder {test_dir}")
    gt_dir = folder / "ground_truth"
    has_masks = gt_dir.is_dir()
    defect_dirs = sorted(
        (d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: (d.name != "good", d.name),
    )
    test: list[TestSample] = []
    missing_masks: list[Path] = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        for path in list_images(defect_dir, recursive=False):
            mask_path = None
            if has_masks and defect != "good":
                mask_path = gt_dir / defect / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    missing_masks.append(mask_path)
            test.append(TestSample(path, int(defect != "good"), defect, mask_path))
    if not test:
        raise ValueError(f"{test_dir}: no test images")
    if missing_masks:
        raise ValueError(
            f"{folder}: {len(missing_masks)} defect image(s) have no ground-truth mask; "
            f"first expected mask: {missing_masks[0]}"
        )
    return MVTecCategory(folder.name, folder, train, test, has_masks)


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as a bool array (pixel > 127), checking it is ``shape`` (H, W).

    Multi-channel masks use their first channel.
    """
    mask = load_image(path)[..., 0] > 127
    if mask.shape != tuple(shape):
        raise ValueError(
            f"{path}: mask size (H, W) = {mask.shape} does not match the image size {tuple(shape)}"
        )
    return mask


def few_shot_references(paths: Sequence[Path], shots: int, seed: int = 0) -> list[Path]:
    """Pick the ``shots`` reference images for a few-shot run, reproducibly.

    The protocol: sort the paths; seed ``s`` takes the s-th consecutive slice of ``shots``
    images, so different seeds use disjoint references.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    needed = (seed + 1) * shots
    if needed > len(paths):
        raise ValueError(
            f"not enough images for {shots}-shot seed {seed}: {needed} are needed, "
            f"only {len(paths)} exist"
        )
    return sorted(paths)[seed * shots : needed]


def link_subsample(
    category: MVTecCategory, target: Path, train_every: int, test_every: int
) -> Path:
    """An MVTec-layout copy of every n-th train and test image, as symbolic links (no data
    copied), for quicker runs of benchmarks and tests. Returns `target`."""

    def link(source: Path, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), destination)

    for path in category.train[::train_every]:
        link(path, target / "train" / "good" / path.name)
    for sample in category.test[::test_every]:
        link(sample.path, target / "test" / sample.defect / sample.path.name)
        if sample.mask_path is not None:
            link(sample.mask_path, target / "ground_truth" / sample.defect / sample.mask_path.name)
    return target
