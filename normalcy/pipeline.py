"""The one predict path: decode -> resize -> backbone -> patch scores -> image score -> decision.

The library, the CLI, the service and eval all predict through `Pipeline`. It never asks what
a method is: every method answers `score_batch` with `GridScores`. Image scores and thresholds
come from maps at a fixed scale of the patch grid (`postprocess.score_map`), so they do not
depend on the image's pixel count; maps at image size and masks are made only when a caller
reads `Prediction.anomaly_map` or `Prediction.mask`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from normalcy.backbones import Backbone
from normalcy.data import ImageInput, ImageLoadError
from normalcy.inputs import LoadedImage, decoded_ahead
from normalcy.methods.base import GridScores, Method
from normalcy.postprocess import (
    SIGMA_AT_256,
    UPSAMPLING,
    fill_gaps,
    ranking_top,
    score_map,
)
from normalcy.prediction import Prediction

# Images gathered per bucketing window: those of one input size among them share batches.
WINDOW_BATCHES = 4


@dataclass(frozen=True)
class MapSettings:
    """How patch scores become maps: smoothing, gap filling and the upsampling of the map
    users see (see `postprocess`); image scores always come from the bilinear map, smoothed
    per tile when tiling (`score_cells`)."""

    sigma: float = SIGMA_AT_256
    closing: int = 3
    upsample: str = "bicubic"
    # Patches across one tile when tiling: image scores smooth per tile (`ranking_score`).
    score_cells: int | None = None

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {self.upsample!r}")

    def shown_map(self, patches: torch.Tensor, dense: bool) -> torch.Tensor:
        """The map users see, at the fixed scale: gaps filled over `closing` patches (the
        same extent in the image on a dense grid of twice the density)."""
        width = 2 * self.closing - 1 if dense else self.closing
        return score_map(fill_gaps(patches, width), self.sigma, dense, self.upsample)


def grid_image_score(scores: GridScores, maps: MapSettings) -> float | torch.Tensor:
    """The method's own image score, or the top of its ranking map (a 0-d tensor)."""
    if scores.image is not None:
        return scores.image
    ranking = scores.patches if scores.ranking is None else scores.ranking
    return ranking_top(ranking, maps.sigma, maps.score_cells)


def feature_grids(
    backbone: Backbone, images: Iterable[LoadedImage], batch_size: int, dense: bool = False
) -> Iterator[tuple[list[LoadedImage], list[torch.Tensor]]]:
    """Windows of images and their feature grids, in order. Each window holds
    `WINDOW_BATCHES` batches' worth of images, and images of one input size within it share
    forward passes of up to `batch_size`: mixed sizes are bucketed, memory stays bounded."""
    remaining = iter(images)
    while window := list(itertools.islice(remaining, batch_size * WINDOW_BATCHES)):
        pixels = [item.image for item in window]
        yield window, backbone.features(pixels, dense=dense, batch_size=batch_size)


@dataclass
class Pipeline:
    """A fitted method behind a backbone: images in, predictions out.

    dense: maps from the half-stride grid (three more shifted backbone passes); image scores
        and decisions stay those of the plain grid, so thresholds hold either way.
    """

    backbone: Backbone
    method: Method
    maps: MapSettings = field(default_factory=MapSettings)
    dense: bool = False
    batch_size: int = 8
    threshold: float | None = None
    pixel_threshold: float | None = None

    def image_score(self, scores: GridScores) -> float:
        """The method's own image score, or the top of its ranking map."""
        return float(grid_image_score(scores, self.maps))

    def prediction(
        self,
        name: str,
        size: tuple[int, int],
        scores: GridScores,
        shown: torch.Tensor | None = None,
    ) -> Prediction:
        """The prediction for the image `name` of `size` (H, W) from its scores (`shown`: the
        dense grid's patch scores for the map, when predicting with the dense map)."""
        score = self.image_score(scores)
        patches = (scores.patches if shown is None else shown).cpu()
        return Prediction(
            name=name,
            score=score,
            is_anomalous=None if self.threshold is None else bool(score > self.threshold),
            threshold=self.threshold,
            image_size=tuple(size),
            draw_map=partial(self.maps.shown_map, patches, shown is not None),
            pixel_threshold=self.pixel_threshold,
        )

    @torch.inference_mode()
    def predict_images(self, images: Iterable[LoadedImage]) -> Iterator[Prediction]:
        """Predictions for decoded images, in order."""
        for batch, grids in feature_grids(self.backbone, images, self.batch_size, self.dense):
            if self.dense:
                plain = self.method.score_batch([g[::2, ::2] for g in grids])
                shown = [s.patches for s in self.method.score_batch(grids)]
            else:
                plain, shown = self.method.score_batch(grids), [None] * len(grids)
            for item, scores, dense in zip(batch, plain, shown, strict=True):
                yield self.prediction(item.name, item.size, scores, dense)

    def predict(
        self, sources: Sequence[ImageInput], on_image: Callable[[], None] | None = None
    ) -> Iterator[Prediction | ImageLoadError]:
        """A prediction per source, in order; an unreadable source yields its error in its
        place. Decoding runs ahead in a thread, at the reduced size the backbone needs."""
        decoded = decoded_ahead(sources, self.backbone.decode_side)
        pending: list[LoadedImage] = []

        def flush() -> Iterator[Prediction]:
            yield from self.predict_images(pending)
            if on_image is not None:
                for _ in pending:
                    on_image()
            pending.clear()

        for item in decoded:
            if isinstance(item, ImageLoadError):
                yield from flush()
                if on_image is not None:
                    on_image()
                yield item
                continue
            pending.append(item)
            if len(pending) == self.batch_size * WINDOW_BATCHES:
                yield from flush()
        yield from flush()
