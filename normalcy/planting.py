"""Planted defects: synthetic anomalies with exact masks, drawn into normal images, so that a
setting can be measured on a part for which no defect image exists.

Each kind stands for a way parts fail, not for a data set's defect types:
- copied: structure moved from elsewhere in the same image (CutPaste), as a patch or a thin
  scar: right-looking texture in the wrong place; half the patches are blended in seamlessly
  (Poisson image editing, as NSA does), so that no edge or step of brightness gives them
  away and only the misplaced structure does;
- texture: foreign texture blended in under a smooth-noise mask (as DRAEM's Perlin masks):
  contamination, stains with structure;
- missing: material gone, filled with the blurred surroundings or the image's darkest or
  brightest colour: holes, missing components;
- line: one- or two-pixel lines and dots in a contrasting colour, at the scale of the finest
  detail: scratches, cracks, shorts, specks;
- blotch: a smooth change of brightness or colour: discolouration, uneven coating;
- warp: a small local displacement of the image: dents, bent leads, misplaced features.
Sizes run from a few pixels to about a tenth of the image's short side. The mask is exactly
the set of pixels whose value changed.

`vary` makes the opposite: a normal image as the line may also see it, which a setting must
not take for a defect. How much it changes exposure and adds sensor noise is what the normal
images themselves show (`Variation.of`): grey, noisy tiles whose brightness drifts are varied;
binarised boards, whose levels and pixels never drift, are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu

KINDS = ("copied", "texture", "missing", "line", "blotch", "warp")
SMALLEST = 3  # px: the smallest defect extent planted
LARGEST_SHARE = 0.1  # of the image's short side: the largest defect extent planted
MIN_CHANGED = 4  # pixels a planted defect must change to count (else it is planted again)
ATTEMPTS = 8


@dataclass(frozen=True)
class Planted:
    """A normal image with one planted defect: the image, which pixels changed, the kind and
    the defect's extent in pixels."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool: exactly the changed pixels
    kind: str
    size: int


def defect_size(shape: tuple[int, ...], rng: np.random.Generator) -> int:
    """An extent in pixels, log-uniform from `SMALLEST` to a tenth of the short side."""
    largest = max(SMALLEST + 1, int(LARGEST_SHARE * min(shape[:2])))
    return int(round(math.exp(rng.uniform(math.log(SMALLEST), math.log(largest)))))


def plant(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str | None = None,
    size: int | None = None,
) -> Planted:
    """`image` (H, W, 3 uint8) with one defect of `kind` (default: drawn from `KINDS`) and
    extent `size` px (default: `defect_size`) planted at a random place."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"plant takes (H, W, 3) uint8 images, got {image.shape} {image.dtype}")
    kind = kind or str(rng.choice(KINDS))
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {KINDS}")
    size = size or defect_size(image.shape, rng)
    size = max(1, min(size, *image.shape[:2]))
    draw = _DRAW[kind]
    for _ in range(ATTEMPTS):  # a flat region may hide a defect: place it again
        changed = draw(image.astype(np.float32), rng, size)
        planted = np.clip(np.rint(changed), 0, 255).astype(np.uint8)
        mask = (planted != image).any(axis=2)
        if mask.sum() >= min(MIN_CHANGED, size * size):
            break
    return Planted(planted, mask, kind, size)


# The most a varied image changes: exposure (log gain and log gamma) and noise (grey levels).
MAX_EXPOSURE = math.log(1.25)
MAX_NOISE = 2.0


@dataclass(frozen=True)
class Variation:
    """The benign variation a set of normal images shows: `exposure`, the spread (standard
    deviation) of the log of their bright level across the images; `noise`, the typical
    grey-level noise within one (a median-filter residual's robust spread)."""

    exposure: float
    noise: float

    @classmethod
    def of(cls, images: Sequence[np.ndarray]) -> Variation:
        """What `images` (uint8) show, each capped at the most `vary` applies."""
        greys = [_grey(image) for image in images]
        levels = [math.log(1 + float(np.percentile(g, 99))) for g in greys]
        noise = [_noise_level(g) for g in greys]
        spread = float(np.std(levels)) if len(levels) > 1 else 0.0
        return cls(min(spread, MAX_EXPOSURE), min(float(np.median(noise)), MAX_NOISE))

    @property
    def any(self) -> bool:
        """Whether the images vary at all (else a varied image is the image itself)."""
        return self.exposure > 0 or self.noise > 0


def vary(image: np.ndarray, rng: np.random.Generator, variation: Variation) -> np.ndarray:
    """`image` with its exposure (gain and gamma, each within `variation.exposure` in log)
    changed and `variation.noise` grey levels of noise added: still normal."""
    gain, gamma = np.exp(rng.uniform(-variation.exposure, variation.exposure, 2))
    scaled = (image.astype(np.float32) / 255) ** gamma * gain
    noisy = scaled * 255 + rng.normal(0, variation.noise, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    return image.mean(axis=2) if image.ndim == 3 else image.astype(np.float32)


def _noise_level(grey: np.ndarray) -> float:
    """Grey levels of pixel noise: 1.4826 times the median absolute difference from the 3 x 3
    median (0 for binarised or noiseless images, where most pixels equal their median)."""
    residual = grey - ndimage.median_filter(grey, 3)
    return 1.4826 * float(np.median(np.abs(residual)))


# ------------------------------------------------------------------------------ regions
def _place(shape: tuple[int, ...], rng: np.random.Generator, box: int) -> tuple[int, int]:
    """The top-left corner of a `box`-px square inside an image of `shape`."""
    return int(rng.integers(0, shape[0] - box + 1)), int(rng.integers(0, shape[1] - box + 1))


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular smooth blob filling about half of a `size`-px square (float in [0, 1])."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), max(size / 6, 0.5))
    yy, xx = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    falloff = 1 - np.hypot(yy - centre, xx - centre) / (size / 2 + 1e-6)
    field = noise / (noise.std() + 1e-6) * 0.5 + 2 * falloff
    return (field > np.quantile(field, 0.5)).astype(np.float32)


def _full(shape: tuple[int, ...], piece: np.ndarray, top: int, left: int) -> np.ndarray:
    """`piece` placed at (top, left) in a zero (H, W) array."""
    out = np.zeros(shape[:2], dtype=np.float32)
    out[top : top + piece.shape[0], left : left + piece.shape[1]] = piece
    return out


def _thin_line(shape: tuple[int, ...], rng: np.random.Generator, length: int) -> np.ndarray:
    """A straight line 1 or 2 px wide and about `length` px long at a random angle, inside
    the image (float mask)."""
    width = int(rng.integers(1, 3))
    angle = rng.uniform(0, 2 * math.pi)
    dy, dx = math.sin(angle) * length, math.cos(angle) * length
    top = rng.uniform(max(0.0, -dy), max(max(0.0, -dy), shape[0] - width - max(0.0, dy)))
    left = rng.uniform(max(0.0, -dx), max(max(0.0, -dx), shape[1] - width - max(0.0, dx)))
    steps = np.linspace(0, 1, 2 * length + 2)
    ys = np.clip(top + steps * dy, 0, shape[0] - width).astype(int)
    xs = np.clip(left + steps * dx, 0, shape[1] - width).astype(int)
    mask = np.zeros(shape[:2], dtype=np.float32)
    for oy in range(width):
        for ox in range(width):
            mask[ys + oy, xs + ox] = 1.0
    return mask


# ------------------------------------------------------------------------------- kinds
def _copied(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A patch or a scar of the image moved to another place (CutPaste)."""
    shape = image.shape
    if rng.random() < 0.5:
        mask = _full(shape, _blob(rng, size), *_place(shape, rng, size))
    else:
        mask = _thin_line(shape, rng, size)
    shift = tuple(int(rng.integers(size, max(size + 1, side - size))) for side in shape[:2])
    source = np.roll(image, shift, axis=(0, 1))
    if rng.random() < 0.5:
        return seamless_clone(image, source, mask > 0)
    return np.where(mask[..., None] > 0, source, image)


def seamless_clone(target: np.ndarray, source: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`target` with `source` pasted over `region` (H, W bool) by Poisson image editing
    (Perez et al. 2003): inside, the source's gradients; at the border, the target's values.
    The pasted source is corrected by the harmonic function that takes the target's
    difference from it along the border, solved on the region's pixels only (4-neighbours;
    the image edge is a free border). Float arrays (H, W, C)."""
    out = np.array(target, dtype=np.float32)
    ys, xs = np.nonzero(region)
    if not len(ys):
        return out
    index = np.full(region.shape, -1, dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    difference = np.asarray(target, dtype=np.float32) - source
    rows, cols, diagonal = [], [], np.zeros(len(ys))
    rhs = np.zeros((len(ys), out.shape[2]))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < region.shape[0]) & (nx >= 0) & (nx < region.shape[1])
        diagonal += inside
        k, ny, nx = np.flatnonzero(inside), ny[inside], nx[inside]
        neighbour = index[ny, nx]
        inner = neighbour >= 0
        rows.append(k[inner])
        cols.append(neighbour[inner])
        np.add.at(rhs, k[~inner], difference[ny[~inner], nx[~inner]])
    laplacian = sparse.coo_matrix(
        (np.full(sum(len(r) for r in rows), -1.0), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(ys), len(ys)),
    ) + sparse.diags(diagonal)
    correction = splu(laplacian.tocsc()).solve(rhs)
    out[ys, xs] = source[ys, xs] + correction
    return out


def _texture(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Foreign texture (the image turned upside down and shifted, its colours swapped and
    inverted) blended under a smooth-noise mask."""
    shape = image.shape
    turned = np.roll(image[::-1, ::-1], int(rng.integers(0, shape[1])), axis=1)
    foreign = 255 - turned[..., rng.permutation(3)]
    alpha = rng.uniform(0.5, 1.0)
    mask = _full(shape, _blob(rng, size), *_place(shape, rng, size)) * alpha
    return image * (1 - mask[..., None]) + foreign * mask[..., None]


def _missing(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A region filled with its blurred surroundings, or with the darkest or brightest colour."""
    shape = image.shape
    mask = _full(shape, _blob(rng, size), *_place(shape, rng, size))[..., None]
    if rng.random() < 0.5:
        fill = ndimage.gaussian_filter(image, sigma=(size, size, 0))
    else:
        levels = image.reshape(-1, 3).sum(axis=1)
        pick = levels.argmin() if rng.random() < 0.5 else levels.argmax()
        fill = np.broadcast_to(image.reshape(-1, 3)[pick], shape)
    return image * (1 - mask) + fill * mask


def _line(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A 1-2 px line of `size` px, or a few dots, in the colour farthest from the local one."""
    shape = image.shape
    if rng.random() < 0.7:
        mask = _thin_line(shape, rng, size)
    else:
        mask = np.zeros(shape[:2], dtype=np.float32)
        top, left = _place(shape, rng, size)
        for _ in range(int(rng.integers(1, 4))):
            y, x = top + int(rng.integers(0, size)), left + int(rng.integers(0, size))
            mask[y : y + 2, x : x + 2] = 1.0
    local = image[mask > 0].mean(axis=0)
    colour = np.where(local > 127, 0.0, 255.0)
    return np.where(mask[..., None] > 0, colour, image)


def _blotch(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth change of brightness and tint over a blob."""
    shape = image.shape
    soft = ndimage.gaussian_filter(_blob(rng, size), size / 6)
    mask = _full(shape, soft / (soft.max() + 1e-6), *_place(shape, rng, size))[..., None]
    gain = rng.uniform(0.55, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.6)
    tint = rng.uniform(0.85, 1.15, size=3)
    return image * (1 + mask * (gain * tint - 1))


def _warp(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """The image displaced by up to a quarter of `size` under a smooth blob."""
    shape = image.shape
    soft = ndimage.gaussian_filter(_blob(rng, size), size / 4)
    weight = _full(shape, soft / (soft.max() + 1e-6), *_place(shape, rng, size))
    angle = rng.uniform(0, 2 * math.pi)
    reach = max(1.5, size / 4)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    coords = [yy + weight * reach * math.sin(angle), xx + weight * reach * math.cos(angle)]
    return np.stack(
        [ndimage.map_coordinates(image[..., c], coords, order=1, mode="nearest") for c in range(3)],
        axis=2,
    )


_DRAW = {
    "copied": _copied,
    "texture": _texture,
    "missing": _missing,
    "line": _line,
    "blotch": _blotch,
    "warp": _warp,
}
