"""A procedurally generated inspection data set, so `normalcy demo` runs without downloads.

Normal images show a plain-weave fabric (warp and weft threads alternating over and under)
with per-image shifts, slight rotation, yarn irregularity, illumination gradients and sensor
noise. Defective images add one local flaw and a pixel mask of it. The files follow the MVTec
AD layout, so the demo exercises the same loader as real benchmarks.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from normalcy.visualize import save_png

# Images are built channel-first, float32 (3, H, W): numpy broadcasts over a leading axis of 3
# far faster than over a trailing one. A defect draws itself onto such an image (given the
# pixel grids xx, yy) and returns the new image and its per-pixel opacity (H, W).
Defect = Callable[
    [np.random.Generator, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]
]

_REFERENCE_SIZE = 224  # lengths below are in pixels at this size and scale with the image
_PERIOD = 11.0  # thread spacing
_WARP_COLOUR = np.array([0.80, 0.72, 0.58], dtype=np.float32)[:, None, None]  # undyed linen
_WEFT_COLOUR = np.array([0.70, 0.63, 0.52], dtype=np.float32)[:, None, None]
_NOISE_SIGMA = 0.012
# Seeds for each split, so changing one count leaves the images of other splits unchanged.
_SPLIT_KEYS = {"train": 0, "good": 1, "scratch": 2, "stain": 3, "hole": 4}


def _fabric(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A clean plain-weave image, float32 (3, H, W) in about [0, 1], randomly placed."""
    scale = xx.shape[1] / _REFERENCE_SIZE
    period = _PERIOD * scale * rng.uniform(0.97, 1.03)
    angle = math.radians(rng.uniform(-1.5, 1.5))
    cos_a, sin_a = math.cos(angle) / period, math.sin(angle) / period
    u = cos_a * xx + sin_a * yy + rng.uniform(0.0, 2.0)  # position across the warp threads
    v = cos_a * yy - sin_a * xx + rng.uniform(0.0, 2.0)  # position across the weft threads
    sin_u, sin_v = np.sin(np.pi * u), np.sin(np.pi * v)
    abs_u, abs_v = np.abs(sin_u), np.abs(sin_v)
    # 1 where the warp lies on top, 0 where the weft does: a checkerboard of crossings,
    # smoothed so the change-over happens in the dark gaps between threads.
    warp_on_top = 0.5 + 0.5 * np.clip(6.0 * sin_u * sin_v, -1.0, 1.0)

    # Each thread has its own thickness/brightness, like real yarn.
    n_threads = int(np.ceil(max(np.abs(u).max(), np.abs(v).max()))) + 1
    gains = (1.0 + 0.05 * rng.standard_normal((2, 2 * n_threads))).astype(np.float32)
    warp_gain = gains[0][np.floor(u).astype(np.intp) + n_threads]
    weft_gain = gains[1][np.floor(v).astype(np.intp) + n_threads]

    twist_u, twist_v = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 2.0 * np.pi)
    warp = (
        np.sqrt(abs_u)
        * (0.65 + 0.35 * abs_v)  # the thread arches over the crossing one
        * (1.0 + 0.06 * np.sin(2.0 * np.pi * (4.0 * u + 1.5 * v) + twist_u))  # fibre twist
        * warp_gain
    )
    weft = (
        np.sqrt(abs_v)
        * (0.65 + 0.35 * abs_u)
        * (1.0 + 0.06 * np.sin(2.0 * np.pi * (4.0 * v - 1.5 * u) + twist_v))
        * weft_gain
    )
    luminance = 0.3 + 0.7 * (warp_on_top * warp + (1.0 - warp_on_top) * weft)
    tint = (1.0 + 0.012 * rng.standard_normal((3, 1, 1))).astype(np.float32)
    colour = _WEFT_COLOUR + warp_on_top * (_WARP_COLOUR - _WEFT_COLOUR)
    return luminance * colour * tint


def _rgb(colour: list[float]) -> np.ndarray:
    return np.array(colour, dtype=np.float32)[:, None, None]


def _compose(image: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return image * (1.0 - alpha) + target * alpha


def _random_centre(rng: np.random.Generator, size: int, margin: float) -> tuple[float, float]:
    low, high = margin * size, (1.0 - margin) * size
    return rng.uniform(low, high), rng.uniform(low, high)


def _scratch(
    rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A thin straight line, brighter or darker than the cloth, with anti-aliased edges."""
    size = xx.shape[1]
    cx, cy = _random_centre(rng, size, 0.25)
    angle = rng.uniform(0.0, np.pi)
    half_length = 0.5 * rng.uniform(0.3, 0.5) * size
    half_width = max(1.0, rng.uniform(1.2, 2.0) * size / _REFERENCE_SIZE)
    dx, dy = math.cos(angle), math.sin(angle)
    along = np.clip((xx - cx) * dx + (yy - cy) * dy, -half_length, half_length)
    distance = np.hypot(xx - (cx + along * dx), yy - (cy + along * dy))
    alpha = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
    shade = [0.97, 0.96, 0.93] if rng.random() < 0.5 else [0.10, 0.08, 0.07]
    return _compose(image, _rgb(shade), alpha), alpha


def _blob_distance(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, radii: tuple[float, float]
) -> np.ndarray:
    """Distance from a random centre in units of an irregular ellipse's radius (1 = edge)."""
    cx, cy = _random_centre(rng, xx.shape[1], 0.15)
    angle = rng.uniform(0.0, np.pi)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    x = (xx - cx) * cos_a + (yy - cy) * sin_a
    y = (yy - cy) * cos_a - (xx - cx) * sin_a
    theta = np.arctan2(y, x)
    phase_3, phase_5 = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 2.0 * np.pi)
    wobble = 1.0 + 0.12 * np.sin(3.0 * theta + phase_3) + 0.08 * np.sin(5.0 * theta + phase_5)
    return np.hypot(x / radii[0], y / radii[1]) / wobble


def _stain(
    rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged blob that darkens and discolours the cloth (coffee or oil)."""
    size = xx.shape[1]
    radii = (rng.uniform(0.04, 0.08) * size, rng.uniform(0.04, 0.08) * size)
    distance = _blob_distance(rng, xx, yy, radii)
    ramp = np.clip((1.3 - distance) / 0.6, 0.0, 1.0)  # alpha 0.5 exactly at distance 1
    alpha = ramp * ramp * (3.0 - 2.0 * ramp)
    filter_colour = [0.62, 0.48, 0.30] if rng.random() < 0.5 else [0.55, 0.56, 0.60]
    return _compose(image, image * _rgb(filter_colour), alpha), alpha


def _hole(
    rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A small ragged gap in the weave showing the dark backing, with a sharp edge."""
    size = xx.shape[1]
    radii = (rng.uniform(0.03, 0.05) * size, rng.uniform(0.03, 0.05) * size)
    distance = _blob_distance(rng, xx, yy, radii)
    alpha = np.clip((1.0 - distance) * min(radii) + 0.5, 0.0, 1.0)  # about 1 px wide edge
    fibres = 1.0 + 0.3 * rng.random(alpha.shape, dtype=np.float32)
    backing = _rgb([0.06, 0.05, 0.05]) * fibres
    return _compose(image, backing, alpha), alpha


DEFECTS: dict[str, Defect] = {"scratch": _scratch, "stain": _stain, "hole": _hole}


def _finish(
    rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Camera effects on top of the scene: uneven lighting, exposure, sensor noise.

    Returns the uint8 (H, W, 3) image as written to disk.
    """
    size = xx.shape[1]
    gx, gy = rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)
    exposure = rng.uniform(0.95, 1.05)
    lighting = exposure * (1.0 + gx * (xx / size - 0.5) + gy * (yy / size - 0.5))
    noise = rng.standard_normal(image.shape, dtype=np.float32) * _NOISE_SIGMA
    noisy = np.clip(image * lighting + noise, 0.0, 1.0)
    return np.ascontiguousarray(np.rint(noisy * 255).astype(np.uint8).transpose(1, 2, 0))


def make_demo_dataset(
    root: str | os.PathLike[str],
    category: str = "woven_fabric",
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect: int = 24,
    size: int = 224,
    seed: int = 0,
) -> Path:
    """Write a deterministic MVTec-AD-style data set under root/<category> and return that path.

    Layout: train/good/NNN.png, test/good/NNN.png, test/<defect>/NNN.png and
    ground_truth/<defect>/NNN_mask.png (0/255), with defects "scratch", "stain" and "hole"
    shared out in turn. An existing root/<category> is replaced as a whole, so no files from
    an earlier run survive.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise ValueError("image counts must not be negative")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{category}."))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; it becomes the data set folder
    test, ground_truth = staging / "test", staging / "ground_truth"
    try:
        for split, folder, count in (
            ("train", staging / "train" / "good", n_train),
            ("good", test / "good", n_test_good),
        ):
            for index in range(count):
                rng = np.random.default_rng([seed, _SPLIT_KEYS[split], index])
                image = _finish(rng, _fabric(rng, xx, yy), xx, yy)
                save_png(folder / f"{index:03d}.png", image, fast=True)
        for kind_index, (kind, draw) in enumerate(DEFECTS.items()):
            count = len(range(kind_index, n_test_defect, len(DEFECTS)))
            for index in range(count):
                rng = np.random.default_rng([seed, _SPLIT_KEYS[kind], index])
                image, alpha = draw(rng, _fabric(rng, xx, yy), xx, yy)
                image = _finish(rng, image, xx, yy)
                save_png(test / kind / f"{index:03d}.png", image, fast=True)
                mask = np.where(alpha > 0.5, 255, 0).astype(np.uint8)
                save_png(ground_truth / kind / f"{index:03d}_mask.png", mask)
        _replace_dir(staging, root / category)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root / category


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`, first moving any old `target` aside and then deleting it."""
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old / target.name)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)
