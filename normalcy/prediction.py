"""What normalcy says about one image: its score, decision, map and mask.

Torch-free (numpy only), so the library and the runtime of exported models return the same
`Prediction`, and maps reach image size by the same `resize_map`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from normalcy.data import ImageInput, ImageLoadError
from normalcy.inputs import is_single_input


def _bilinear_taps(source: int, target: int, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """For target samples start..stop-1 of a bilinear resize from `source` to `target`
    samples (half-pixel centres, edges clamped): the two source samples each blends and the
    weight of the second."""
    position = (np.arange(start, stop, dtype=np.float64) + 0.5) * (source / target) - 0.5
    position = np.clip(position, 0, None)
    below = np.minimum(np.floor(position).astype(np.int64), source - 1)
    above = np.minimum(below + 1, source - 1)
    return below, above, (position - below).astype(np.float32)


def resize_map(
    scale_map: Any, size: tuple[int, int], rows: tuple[int, int] | None = None
) -> np.ndarray:
    """A map (h, w) at the fixed scale resized bilinearly to an image of `size` (H, W), as
    `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` does: float32.
    `rows` (start, stop): only those rows, so a map of any size can be made in bands at what
    its pixels cost."""
    grid = np.asarray(scale_map, dtype=np.float32)
    height, width = size
    start, stop = (0, height) if rows is None else rows
    if not 0 <= start <= stop <= height:
        raise ValueError(f"rows {rows} outside a map of {height} rows")
    if grid.shape == (height, width):
        return grid[start:stop].copy()
    # Along columns on the small map first; then each output row is its map row below plus a
    # share of the step to the next one (two row gathers, the fewest passes at image size).
    left, right, weight = _bilinear_taps(grid.shape[1], width, 0, width)
    columns = grid[:, left] * (1 - weight) + grid[:, right] * weight
    steps = np.vstack([np.diff(columns, axis=0), np.zeros((1, width), np.float32)])
    below, _, weight = _bilinear_taps(grid.shape[0], height, start, stop)
    band = np.take(columns, below, axis=0)
    rise = np.take(steps, below, axis=0)
    rise *= weight[:, None]  # the last row's step is 0: edges are held, as when clamped
    band += rise
    return band


@dataclass(eq=False)
class Prediction:
    """The result for one image. `is_anomalous` and `mask` are None when no threshold is set.

    `score` and `is_anomalous` are computed when predicting; `score_map` (the map at the fixed
    scale of the patch grid, drawn by `draw_map`), `anomaly_map` (at image size) and `mask`
    when first read.
    """

    name: str
    score: float
    is_anomalous: bool | None
    threshold: float | None
    image_size: tuple[int, int]
    draw_map: Callable[[], Any] = field(repr=False)
    pixel_threshold: float | None = None

    @cached_property
    def score_map(self) -> np.ndarray:
        """(h, w) float32 map at the fixed scale of the patch grid."""
        return np.asarray(self.draw_map(), dtype=np.float32)

    @cached_property
    def anomaly_map(self) -> np.ndarray:
        """(H, W) float32 map at the image's own size."""
        return resize_map(self.score_map, self.image_size)

    @cached_property
    def mask(self) -> np.ndarray | None:
        """(H, W) bool: where the map exceeds the level held-out normal images stay under."""
        if self.pixel_threshold is None:
            return None
        return self.anomaly_map > self.pixel_threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": self.score,
            "is_anomalous": self.is_anomalous,
            "threshold": self.threshold,
        }


def gathered(
    outcomes: Iterable[Prediction | ImageLoadError], inputs: ImageInput | Sequence[ImageInput]
) -> Prediction | list[Prediction]:
    """`predict`'s answer from `predict_iter`'s outcomes: one prediction for one image, else a
    list; the first unreadable input raises its `ImageLoadError`."""
    results = []
    for outcome in outcomes:
        if isinstance(outcome, ImageLoadError):
            raise outcome
        results.append(outcome)
    return results[0] if is_single_input(inputs) else results
