"""Choosing a setting from normal images alone (`--setting auto`).

Each candidate setting is fitted on part of the normal images and scored on the others: as
they are, with a benign change of exposure and noise as large as the images show among
themselves (`planting.vary`: still normal, since a line's lighting drifts; none where they
show none), and with planted defects (`planting.plant`). It is judged by image AUROC
(planted against both kinds of normal) and AUPRO on the planted masks, and by its predict
time from the files, measured here. The chosen one has the best mean of the two
among those within the time budget; candidates within `TIE` of the best count as tied and
the fastest of them wins, so detail is paid for only where it pays.

Few-shot fits are judged the same way with each of up to `FEW_SHOT_FOLDS` references left
out in turn: a few-shot model of the others scores it clean and planted. A single reference
is split into its eight rotated and mirrored views, each held view scored against a model of
the other seven (a stand-in for another part in another pose; on a part that is not
symmetric it looks less normal than a new image would, so the clean scores run high for
every candidate and the choice rests on fewer differences).
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
from normalcy.fitting import augmentations
from normalcy.metrics import aupro, image_auroc
from normalcy.planting import KINDS, Variation, plant, vary
from normalcy.setting import SETTINGS, Setting

log = logging.getLogger("normalcy")

# The family `auto` chooses from, by name in `SETTINGS`: the whole image at two resolutions,
# DINOv2 tiles, and the two fine-detail settings.
CANDIDATES = ("default", "dinov2-448", "dinov2-tiles", "fine-detail", "fine-detail-outline")
FIT_IMAGES = 16  # normal images each candidate is fitted on, at most
HELD_IMAGES = 8  # normal images scored clean, varied and planted, at most
# Planted defects per held-out image, each its own image. An AUROC from 16 planted images
# against 8 clean ones is uncertain by about 0.07, more than what separates close settings;
# 32 narrow it for a fifth more choosing time (Magnetic Tile 77 -> 89 s, DeepPCB 113 -> 146 s).
PLANTS_PER_IMAGE = 4
MIN_IMAGES = 6  # fewer normal images than this leave too few to fit and score
FEW_SHOT_FOLDS = 4  # few-shot references left out in turn, at most
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
class Fold:
    """One fit of a candidate: the normal images it is fitted on, which held-out images it
    scores (by their index), and what the fit changes in the detector (few-shot counts)."""

    fit: list[ImageInput]
    held: list[int]
    changes: dict[str, Any]


@dataclass(frozen=True)
class PlantedSet:
    """Normal images as they are, varied (`vary`), and with defects planted (`plant`)."""

    images: list[np.ndarray]
    masks: list[np.ndarray]  # empty for the normal ones
    kinds: list[str]  # "normal", "varied", or the planted defect's kind
    sources: list[int]  # the held-out image each one was made from

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
    sources = list(range(len(images))) + list(range(len(varied)))
    for i, image in enumerate(images):
        for j in range(PLANTS_PER_IMAGE):
            planted = plant(image, rng, KINDS[(i * PLANTS_PER_IMAGE + j) % len(KINDS)])
            out.append(planted.image)
            masks.append(planted.mask)
            kinds.append(planted.kind)
            sources.append(i)
    return PlantedSet(out, masks, kinds, sources)


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
    make_detector: Callable[..., Any],
    candidates: Mapping[str, Setting] | None = None,
    max_ms_per_image: float | None = None,
    seed: int = 0,
    progress: bool = False,
    memo: ForwardMemo | None = None,
    tiles: bool = True,
    few_shot: bool = False,
) -> Selection:
    """The candidate (default: `CANDIDATES`; without `tiles`, those that take the whole image
    in one pass) whose fit on part of `sources` finds defects planted into the rest best,
    within `max_ms_per_image` when given (see the module docstring); `few_shot`: `sources`
    are few-shot references, left out in turn.
    `make_detector(setting, **changes)` gives an unfitted detector in that setting, with
    `changes` to its parameters; where their backbones share `memo`, it is not read while
    predict time is measured."""
    memo = ForwardMemo() if memo is None else memo  # an empty memo is falsy
    candidates = {
        name: setting
        for name, setting in (candidates or {n: SETTINGS[n] for n in CANDIDATES}).items()
        if tiles or setting.tile_scale is None
    }
    plan = _few_shot_folds(sources, seed) if few_shot else _folds(sources, seed)
    folds, held_inputs, held_images = plan
    planted = planted_set(held_images, seed)
    trials = []
    bar = tqdm(candidates.items(), desc="choosing a setting", unit="setting", disable=not progress)
    for name, setting in bar:
        bar.set_postfix_str(name)
        trials.append(_trial(name, setting, make_detector, folds, held_inputs, planted, memo))
    trials = [
        Trial(**{**asdict(t), "within_budget": _within(t.ms_per_image, max_ms_per_image)})
        for t in trials
    ]
    return Selection(
        choose(trials),
        tuple(trials),
        len(folds[0].fit),
        len(held_images),
        sum(planted.labels),
        max_ms_per_image,
        seed,
    )


Plan = tuple[list[Fold], list[ImageInput], list[np.ndarray]]


def _folds(sources: Sequence[ImageInput], seed: int) -> Plan:
    """One fold: fitted on up to `FIT_IMAGES` images, scoring `HELD_IMAGES` others, which
    are scored from their files (decoding timed too)."""
    fit_at, held_at = split(len(sources), seed)
    held_inputs, held_images = _readable([sources[i] for i in held_at])
    fit = [sources[i] for i in fit_at]
    return [Fold(fit, list(range(len(held_images))), {})], held_inputs, held_images


def _few_shot_folds(references: Sequence[ImageInput], seed: int) -> Plan:
    """Up to `FEW_SHOT_FOLDS` folds, each a few-shot fit of all references but one, which
    it scores; a single reference is split into its views, fitted without augmentation."""
    inputs, images = _readable(references)
    changes: dict[str, Any] = {}
    if len(images) == 1:
        inputs = images = augmentations(images[0])
        changes = {"augment": False}
    if len(images) < 2:
        raise ValueError("choosing a few-shot setting needs a readable reference")
    held = np.random.default_rng(seed).permutation(len(images))[:FEW_SHOT_FOLDS]
    folds = [
        Fold(
            [r for j, r in enumerate(inputs) if j != i],
            [position],
            {**changes, "shots": len(inputs) - 1},
        )
        for position, i in enumerate(held.tolist())
    ]
    return folds, [inputs[i] for i in held], [images[i] for i in held]


def _readable(sources: Sequence[ImageInput]) -> tuple[list[ImageInput], list[np.ndarray]]:
    """The sources that decode, and their images; the others are skipped with a warning."""
    inputs, images = [], []
    for source in sources:
        try:
            images.append(load_image(source))
            inputs.append(source)
        except ImageLoadError as error:
            log.warning("skipped %s", error)
    return inputs, images


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
    setting: Setting,
    make_detector: Callable[..., Any],
    folds: Sequence[Fold],
    held_inputs: Sequence[ImageInput],
    planted: PlantedSet,
    memo: ForwardMemo,
) -> Trial:
    """Fit one candidate per fold (no threshold: the metrics need none) and score the fold's
    share of the planted set: first its clean images from their sources, timed (decoding
    included, no pass taken from `memo`, the very first image a warm-up), then the varied
    and planted ones. Its warnings (files skipped) are the final fit's to give, once."""
    predictions: list[Any] = [None] * len(planted.images)
    fit_seconds, timed_seconds, timed_images, warm = 0.0, 0.0, 0, False
    with _quiet():
        for fold in folds:
            detector = make_detector(setting, **fold.changes)
            start = time.perf_counter()
            detector.fit(fold.fit, calibrate=False)
            fit_seconds += time.perf_counter() - start
            held = list(fold.held)
            with memo.writing_only():
                if not warm and (len(held) > 1 or len(folds) > 1):  # unless it is all there is
                    _predict_into(predictions, held[:1], detector, held_inputs)
                    held = held[1:]
                warm = True
                start = time.perf_counter()
                _predict_into(predictions, held, detector, held_inputs)
                timed_seconds += time.perf_counter() - start
                timed_images += len(held)
            changed = [
                k
                for k, source in enumerate(planted.sources)
                if source in fold.held and planted.kinds[k] != "normal"
            ]
            _predict_into(predictions, changed, detector, planted.images)
        auroc, region_overlap = planted_metrics(planted, predictions)
    ms = 1000 * timed_seconds / max(1, timed_images)
    return Trial(name, auroc, region_overlap, ms, fit_seconds / len(folds), True)


def _predict_into(
    predictions: list[Any], at: Sequence[int], detector: Any, images: Sequence[Any]
) -> None:
    """Predict `images[i]` for each i in `at` and store it at `predictions[i]`."""
    found = detector.predict_iter([images[i] for i in at])
    for i, prediction in zip(at, found, strict=True):
        predictions[i] = prediction


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The library's log at errors only, for the time of the block."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
