"""Turn anomaly maps into pictures: colour heatmaps, overlays, thumbnails and PNG files.

Everything works on plain numpy arrays (uint8 RGB images, float maps) so the report, the CLI
and notebooks can share one rendering path.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from normalcy.data import load_image
from normalcy.prediction import Prediction, resize_map

# Anchor colours of a dark-to-bright, perceptually ordered ramp (black, purple, red, orange,
# pale yellow), in the spirit of "inferno"; the 256-entry LUT interpolates between them.
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
_POSITIONS = np.linspace(0.0, 1.0, len(_ANCHORS))
_LUT = (
    np.stack(
        [np.interp(np.linspace(0.0, 1.0, 256), _POSITIONS, _ANCHORS[:, c]) for c in range(3)],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)

# Cyan does not occur in the ramp above, so mask outlines stay visible on any heat value.
OUTLINE_COLOUR = np.array([0, 255, 255], dtype=np.uint8)
_OUTLINE_WIDTH = 2
_Z_HUFFMAN_ONLY = 2  # zlib compression strategy
MAX_OVERLAY_PIXELS = 16_000_000  # map files: larger overlays are written reduced
MAP_BAND_ROWS = 256  # rows of a full-size map made at a time


def heatmap(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Colour a float (H, W) map as uint8 (H, W, 3); values are clipped to [vmin, vmax].

    NaNs are drawn like vmin. When vmax <= vmin every pixel gets the darkest colour.
    """
    values = np.asarray(anomaly_map, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {values.shape}")
    span = vmax - vmin
    if span > 0:
        scaled = (np.nan_to_num(values, nan=vmin) - vmin) / span
        index = np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.intp)
    else:
        index = np.zeros(values.shape, dtype=np.intp)
    return _LUT[index]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a bool mask within _OUTLINE_WIDTH of its border (the image edge counts too):
    the mask less its erosion by a 4-connected cross, repeated _OUTLINE_WIDTH times."""
    inner = np.asarray(mask, dtype=bool)
    for _ in range(_OUTLINE_WIDTH):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blend the heatmap of `anomaly_map` over a uint8 RGB image; outline `mask` in cyan.

    `alpha` is the weight of the heatmap (0 keeps the image, 1 shows only the heatmap).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {image.shape}")
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(
            f"anomaly_map shape {anomaly_map.shape} does not match image {image.shape[:2]}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = heatmap(anomaly_map, vmin, vmax).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    out = np.rint(blended).astype(np.uint8)
    if mask is not None:
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
        out[_outline(mask.astype(bool))] = OUTLINE_COLOUR
    return out


def bounded_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """(height, width) `size`, scaled down (aspect kept) to at most `max_pixels` pixels."""
    height, width = size
    scale = min(1.0, (max_pixels / (height * width)) ** 0.5)
    return max(1, int(height * scale)), max(1, int(width * scale))


def overlay_decode_side(image_size: tuple[int, int], max_pixels: int) -> int:
    """The `min_side` to decode an image at for its overlay of at most `max_pixels`: loading
    keeps at least twice `min_side`, so the decode is never smaller than the overlay."""
    return max(1, min(bounded_size(image_size, max_pixels)) // 2)


def bounded_overlay(
    image: np.ndarray,
    scale_map: np.ndarray,
    image_size: tuple[int, int],
    vmax: float,
    pixel_threshold: float | None,
    max_pixels: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The overlay and mask of a prediction (its map at the fixed scale, `scale_map`) for an
    image of `image_size`, drawn at that size up to `max_pixels` (larger: reduced, aspect
    kept), so its memory is bounded whatever the image. `image` may come reduced."""
    size = bounded_size(image_size, max_pixels)
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
    anomaly_map = resize_map(scale_map, size)
    mask = None if pixel_threshold is None else anomaly_map > pixel_threshold
    return overlay(image, anomaly_map, 0.0, vmax, mask=mask), mask


def encode_png(array: np.ndarray, *, fast: bool = False) -> bytes:
    """PNG bytes of a uint8 array: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA.

    `fast` uses Huffman-only coding: about twice as fast, and for noisy camera images just as
    small, but larger for flat synthetic content.
    """
    if array.dtype != np.uint8:
        raise ValueError(f"PNG encoding needs uint8 data, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"expected (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    buffer = io.BytesIO()
    options = {"compress_type": _Z_HUFFMAN_ONLY} if fast else {}
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of a uint8 RGB array: a tenth of PNG's size for camera images (reports)."""
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes so readers see either the old file or the complete new one, never a part.

    The temp file lives in the target folder so os.replace stays a same-filesystem rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp_name, 0o644)  # mkstemp creates owner-only files; make it a normal one
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_png(path: str | os.PathLike[str], array: np.ndarray, *, fast: bool = False) -> None:
    """Save a uint8 array as a PNG file, atomically; `fast` as for encode_png."""
    write_atomic(path, encode_png(array, fast=fast))


def thumbnail(array: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longer side is at most `max_side`, keeping the aspect ratio.

    Works for uint8 images (grey, RGB, RGBA) and float (H, W) maps; arrays that already fit
    are returned as they are. Bilinear resampling in Pillow averages over the source area
    when shrinking, so thin structures fade rather than alias.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    height, width = array.shape[:2]
    if max(height, width) <= max_side:
        return array
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if array.dtype == np.uint8:
        source = Image.fromarray(array)
    elif array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
        source = Image.fromarray(array.astype(np.float32))
    else:
        raise ValueError(f"expected uint8 image or float (H, W) map, got {array.dtype}")
    resized = np.asarray(source.resize(size, Image.Resampling.BILINEAR))
    return resized.astype(array.dtype, copy=False)


def write_map_files(out: Path, stem: str, prediction: Prediction, vmax: float) -> dict[str, str]:
    """The map (.npy) and mask at the image's full size, made and written in bands of rows so
    neither the map nor the image is ever whole in memory; the overlay up to 16 megapixels."""
    size = prediction.image_size
    threshold = prediction.pixel_threshold
    mask = None if threshold is None else np.empty(size, np.uint8)
    with open(out / f"{stem}_map.npy", "wb") as npy:
        header = {"descr": "<f4", "fortran_order": False, "shape": tuple(size)}
        np.lib.format.write_array_header_1_0(npy, header)
        for start in range(0, size[0], MAP_BAND_ROWS):
            rows = (start, min(start + MAP_BAND_ROWS, size[0]))
            band = resize_map(prediction.score_map, size, rows)
            npy.write(band.astype("<f4", copy=False).tobytes())
            if mask is not None:
                mask[rows[0] : rows[1]] = (band > threshold) * np.uint8(255)
    files = {"overlay": f"{stem}_overlay.png", "map": f"{stem}_map.npy"}
    if mask is not None:
        save_png(out / f"{stem}_mask.png", mask)
        files["mask"] = f"{stem}_mask.png"
    image = load_image(prediction.name, min_side=overlay_decode_side(size, MAX_OVERLAY_PIXELS))
    shown, _ = bounded_overlay(
        image, prediction.score_map, size, vmax, threshold, MAX_OVERLAY_PIXELS
    )
    save_png(out / f"{stem}_overlay.png", shown)
    return files
