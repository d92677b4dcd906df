"""Choosing a setting from normal images alone (`--setting auto`).

Each candidate setting is fitted on part of the normal images and scored on the others: as
they are, with a benign change of exposure and noise as large as the images show among
themselves (`planting.vary`: still normal, since a line's lighting drifts; none where they
show none), and with planted defects (`planting.plant`). It is judged by image AUROC
(planted against both kinds of normal) and AUPRO on the planted masks, and by its predict
time from the files, measured here. The chosen one has the best mean of the two
among those within the time budget; candidates within `TIE` of the best count as tied and
the fastest of them wins, so detail is paid for only where it pays.
Model selection with synthetic anomalies: Fung et al. (2023), "Model selection of anomaly
detectors in the absence of labeled validation data".

The pure function here knows nothing of `Detector`: it is given a way to make an unfitted
detector from a setting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from normalcy.backbones.memo import ForwardMemo
from normalcy.data import ImageInput, ImageLoadError, load_image
from normalcy.metrics import aupro, image_auroc
from normalcy.planting import KINDS, Variation, plant, vary
from normalcy.setting import SETTINGS, Setting

log = logging.getLogger("normalcy")

# The family `auto` chooses from, by name in `SETTINGS`: the whole image at two resolutions,
# DINOv2 tiles, and the two fine-detail settings.
CANDIDATES = ("default", "dinov2-448", "dinov2-tiles", "fine-detail", "fine-detail-outline")
FIT_IMAGES = 16  # normal images each candidate is fitted on, at most
HELD_IMAGES = 8  # normal images scored clean, varied and planted, at most
PLANTS_PER_IMAGE = 2  # planted defects per held-out image, each its own image
MIN_IMAGES = 6  # fewer normal images than this leave too few to fit and score
TIE = 0.01  # objectives this close are tied; the faster setting wins


@dataclass(frozen=True)
class Trial:
    """One candidate's results on the planted defects."""

    name: str
    image_auroc: float
    aupro: float
    ms_per_image: float
    fit_seconds: float
    within_budget: bool

    @property
    def objective(self) -> float:
        """What the choice maximises: the mean of planted image AUROC and AUPRO."""
        return (self.image_auroc + self.aupro) / 2


@dataclass(frozen=True)
class Selection:
    """The chosen setting's name, every candidate's trial, and what they were measured on."""

    chosen: str
    trials: tuple[Trial, ...]
    fit_images: int
    held_images: int
    planted_images: int
    max_ms_per_image: float | None
    seed: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["trials"] = [{**asdict(t), "objective": t.objective} for t in self.trials]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Selection:
        """What `to_json` wrote; anything else raises a ValueError."""
        try:
            trials = tuple(
                Trial(**{k: v for k, v in t.items() if k != "objective"}) for t in data["trials"]
            )
            return cls(**{**data, "trials": trials})
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a setting selection ({error})") from None

    def table(self) -> str:
        """The candidates as a text table, the chosen one marked."""
        lines = ["setting              planted AUROC  planted AUPRO  ms/img  fit s  chosen"]
        for t in self.trials:
            mark = "*" if t.name == self.chosen else ("over budget" if not t.within_budget else "")
            lines.append(
                f"{t.name:<20} {t.image_auroc:>13.3f}  {t.aupro:>13.3f}  {t.ms_per_image:>6.0f}"
                f"  {t.fit_seconds:>5.1f}  {mark}"
            )
        return "\n".join(lines)


def split(
    n: int, seed: int, fit_max: int = FIT_IMAGES, held_max: int = HELD_IMAGES
) -> tuple[list[int], list[int]]:
    """(fit, held out) indices of `n` normal images, drawn by `seed`: a third (at most
    `held_max`) held out, of the rest at most `fit_max` to fit on."""
    if n < MIN_IMAGES:
        raise ValueError(
            f"fitting on some normal images and planting defects into others needs at least "
            f"{MIN_IMAGES} images, got {n}"
        )
    order = np.random.default_rng(seed).permutation(n).tolist()
    held = min(held_max, n // 3)
    return sorted(order[held : held + fit_max]), sorted(order[:held])


@dataclass(frozen=True)
class PlantedSet:
    """Normal images as they are, varied (`vary`), and with defects planted (`plant`)."""

    images: list[np.ndarray]
    masks: list[np.ndarray]  # empty for the normal ones
    kinds: list[str]  # "normal", "varied", or the planted defect's kind

    @property
    def labels(self) -> list[int]:
        return [int(kind not in ("normal", "varied")) for kind in self.kinds]


def planted_set(images: Sequence[np.ndarray], seed: int) -> PlantedSet:
    """Each image as it is, then each varied as much as the images vary among themselves
    (where they do), then `PLANTS_PER_IMAGE` planted copies of each, kinds taken in turn."""
    rng = np.random.default_rng(seed)
    variation = Variation.of(images)
    varied = [vary(image, rng, variation) for image in images] if variation.any else []
    out = [*images, *varied]
    masks = [np.zeros(i.shape[:2], dtype=bool) for i in out]
    kinds = ["normal"] * len(images) + ["varied"] * len(varied)
    for i, image in enumerate(images):
        for j in range(PLANTS_PER_IMAGE):
            planted = plant(image, rng, KINDS[(i * PLANTS_PER_IMAGE + j) % len(KINDS)])
            out.append(planted.image)
            masks.append(planted.mask)
            kinds.append(planted.kind)
    return PlantedSet(out, masks, kinds)


def score_planted(detector: Any, planted: PlantedSet) -> tuple[float, float, list[Any]]:
    """(image AUROC of planted against normal, AUPRO on the planted masks, the predictions)
    of a fitted detector."""
    predictions = list(detector.predict_iter(list(planted.images)))
    return (*planted_metrics(planted, predictions), predictions)


def planted_metrics(planted: PlantedSet, predictions: Sequence[Any]) -> tuple[float, float]:
    """(image AUROC of planted against normal, AUPRO on the planted masks) of the
    predictions of `planted.images`, in order."""
    scores = [p.score for p in predictions]
    maps = [p.anomaly_map for p in predictions]
    return image_auroc(planted.labels, scores), aupro(planted.masks, maps)


def select_setting(
    sources: Sequence[ImageInput],
    make_detector: Callable[[Setting], Any],
    candidates: Mapping[str, Setting] | None = None,
    max_ms_per_image: float | None = None,
    seed: int = 0,
    progress: bool = False,
    memo: ForwardMemo | None = None,
    tiles: bool = True,
) -> Selection:
    """The candidate (default: `CANDIDATES`; without `tiles`, those that take the whole image
    in one pass) whose fit on part of `sources` finds defects planted into the rest best,
    within `max_ms_per_image` when given (see the module docstring).
    `make_detector(setting)` gives an unfitted detector in that setting; where their
    backbones share `memo`, it is not read while predict time is measured."""
    memo = ForwardMemo() if memo is None else memo  # an empty memo is falsy
    candidates = {
        name: setting
        for name, setting in (candidates or {n: SETTINGS[n] for n in CANDIDATES}).items()
        if tiles or setting.tile_scale is None
    }
    fit_at, held_at = split(len(sources), seed)
    fit_sources = [sources[i] for i in fit_at]
    held_sources, held_images = [], []
    for i in held_at:
        try:
            held_images.append(load_image(sources[i]))
            held_sources.append(sources[i])
        except ImageLoadError as error:
            log.warning("skipped %s", error)
    planted = planted_set(held_images, seed)
    trials = []
    bar = tqdm(candidates.items(), desc="choosing a setting", unit="setting", disable=not progress)
    for name, setting in bar:
        bar.set_postfix_str(name)
        detector = make_detector(setting)
        trials.append(_trial(name, detector, fit_sources, held_sources, planted, memo))
    trials = [
        Trial(**{**asdict(t), "within_budget": _within(t.ms_per_image, max_ms_per_image)})
        for t in trials
    ]
    return Selection(
        choose(trials),
        tuple(trials),
        len(fit_sources),
        len(held_images),
        sum(planted.labels),
        max_ms_per_image,
        seed,
    )


def _within(ms: float, budget: float | None) -> bool:
    return budget is None or ms <= budget


def choose(trials: Sequence[Trial]) -> str:
    """The name of the best trial within budget, the fastest of those within `TIE` of it; the
    fastest of all where none is within budget."""
    eligible = [t for t in trials if t.within_budget]
    if not eligible:
        fastest = min(trials, key=lambda t: t.ms_per_image)
        log.warning(
            "no setting predicts within the time budget; choosing the fastest, %s (%.0f ms)",
            fastest.name,
            fastest.ms_per_image,
        )
        return fastest.name
    best = max(t.objective for t in eligible)
    tied = [t for t in eligible if t.objective >= best - TIE]
    return min(tied, key=lambda t: t.ms_per_image).name


def _trial(
    name: str,
    detector: Any,
    fit_sources: Sequence[ImageInput],
    held_sources: Sequence[ImageInput],
    planted: PlantedSet,
    memo: ForwardMemo,
) -> Trial:
    """Fit one candidate (no threshold: the metrics need none) and score the planted set:
    first the clean images from their files, timed (decoding included, no pass taken from
    `memo`: after a warm-up on the first), then the varied and planted ones. Its warnings
    (files skipped) are the final fit's to give, once."""
    with _quiet():
        start = time.perf_counter()
        detector.fit(fit_sources, calibrate=False)
        fit_seconds = time.perf_counter() - start
        with memo.writing_only():
            clean = list(detector.predict_iter(held_sources[:1]))  # first-call costs
            start = time.perf_counter()
            clean += list(detector.predict_iter(held_sources[1:]))
            ms = 1000 * (time.perf_counter() - start) / max(1, len(held_sources) - 1)
        changed = list(detector.predict_iter(planted.images[len(held_sources) :]))
        auroc, region_overlap = planted_metrics(planted, clean + changed)
    return Trial(name, auroc, region_overlap, ms, fit_seconds, True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The library's log at errors only, for the time of the block."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
