"""How a `Detector` learns: the method's fit on feature grids, and the normal images' results
that its thresholds are set from (see `calibration` for why each scheme).

Three schemes, by how many normal images there are and what the method can do:
- left out: the method fits on every image, then scores up to `CALIBRATION_MAX` of them as if
  each had been left out (patch kNN and golden templates);
- held out: every 10th image is kept out of the fit and scored (the other full-shot methods);
- leave one out: below `MIN_IMAGES_FOR_HOLDOUT` images, or for few-shot methods that cannot
  leave out, each image is scored by a model of the others.
Few-shot banks thus keep every reference, and their threshold rests on one score per
reference, never on the one or two images a 10% hold-out would leave.
The single-machine fit (`fit`) and the Ray fit (`normalcy.distributed`) share these pieces.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from normalcy.backbones.memo import ForwardMemo
from normalcy.calibration import CALIBRATION_MAX, UNCALIBRATED, thresholds_from
from normalcy.data import ImageInput, ImageLoadError
from normalcy.inputs import LoadedImage, decoded_ahead, expand_inputs
from normalcy.methods import method_for
from normalcy.methods.base import FitSettings, GridScores, Method
from normalcy.methods.fused import KNNGaussianFusion
from normalcy.methods.mutual import MutualScorer
from normalcy.pipeline import feature_grids

if TYPE_CHECKING:
    from normalcy.detector import Detector

log = logging.getLogger("normalcy")

# Below this many normal images, hold out by leave-one-out rather than a fixed split.
MIN_IMAGES_FOR_HOLDOUT = 10
HOLDOUT_EVERY = 10  # every 10th normal image (by sorted name) is held out for the threshold
# (image score, map peak) of each normal image no model saw
NormalResults = list[tuple[float, float]]


def held_out_split(sources: Sequence[ImageInput]) -> tuple[list, list]:
    """(bank, held out): every `HOLDOUT_EVERY`-th normal image is held out for the threshold."""
    held = [i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for i in range(len(sources))]
    return (
        [s for s, out in zip(sources, held, strict=True) if not out],
        [s for s, out in zip(sources, held, strict=True) if out],
    )


AUGMENTED_VIEWS = 8  # views of each few-shot reference that `augmentations` gives


def augmentations(image: np.ndarray) -> list[np.ndarray]:
    """The image, its 90/180/270-degree rotations and their mirror images (8 views).

    Few-shot references gain the pose variety a handful of images lacks (AnomalyDINO).
    """
    rotations = [np.rot90(image, k) for k in range(4)]
    return [np.ascontiguousarray(v) for r in rotations for v in (r, r[:, ::-1])]


def new_method(detector: Detector, few_shot: bool) -> Method:
    """An unfitted instance of the detector's method, in its settings."""
    setting = detector.active_setting
    if setting.method == MutualScorer.name:
        raise ValueError(
            "the mutual method is zero-shot: it needs no fit; call zero_shot(images) "
            "(CLI: normalcy predict --zero-shot INPUT_DIR -o OUT)"
        )
    settings = FitSettings(
        few_shot=few_shot,
        coreset_ratio=setting.coreset_ratio,
        max_bank_size=setting.max_bank_size,
        seed=detector.seed,
        precision=detector.precision,
        low_variance_fraction=setting.low_variance_fraction,
        context_half=detector.backbone_model().context > 0,
    )
    return method_for(setting.method, settings)


def decoded(
    detector: Detector,
    sources: Sequence[ImageInput],
    what: str,
    record: bool = True,
    readable: list[ImageInput] | None = None,
) -> Iterator[LoadedImage]:
    """Decoded images (ahead, in a thread); a broken file is logged by name and skipped,
    never fatal (`record`: and listed in `skipped_`, once per fit; `readable`: the sources of
    the images yielded are appended to it, in order)."""
    bar = tqdm(total=len(sources), desc=what, unit="img", disable=not detector.progress)
    detector.skipped_ = getattr(detector, "skipped_", [])
    detector.input_sizes_ = getattr(detector, "input_sizes_", Counter())
    backbone = detector.backbone_model()
    for source, item in zip(sources, decoded_ahead(sources, detector.decode_side), strict=True):
        bar.update()
        if isinstance(item, ImageLoadError):
            if record:
                log.warning("skipped %s", item)
                detector.skipped_.append(str(item))
        else:
            if record:
                detector.input_sizes_[backbone.network_size(*item.size)] += 1
            if readable is not None:
                readable.append(source)
            yield item
    bar.close()


def grids(detector: Detector, images: Iterable[LoadedImage]) -> Iterator[torch.Tensor]:
    """Plain feature grids, computed a batch at a time so memory stays bounded."""
    for _, window in feature_grids(detector.backbone_model(), images, detector.batch_size):
        yield from window


def bank_grids(
    detector: Detector, images: Iterable[LoadedImage], few_shot: bool
) -> Iterator[torch.Tensor]:
    """Grids of the images a bank is built from: few-shot references with their augmented
    views (unless `augment` is off), `views_per_image` consecutive grids each."""
    augment = views_per_image(detector, few_shot) > 1
    views = (
        LoadedImage(item.name, view)
        for item in images
        for view in (augmentations(item.image) if augment else [item.image])
    )
    yield from grids(detector, views)


def views_per_image(detector: Detector, few_shot: bool) -> int:
    """How many grids each image gives a bank: its augmented views in few-shot mode."""
    return AUGMENTED_VIEWS if few_shot and detector.augment else 1


def normal_results(
    detector: Detector, method: Method, scores: Iterable[GridScores]
) -> NormalResults:
    """Image score and map peak of each normal image that no bank has seen."""
    pipeline = detector.pipeline(method, dense=False)
    predictions = (pipeline.prediction("", (1, 1), s) for s in scores)
    return [(p.score, float(p.score_map.max())) for p in predictions]


def dense_peaks(detector: Detector, method: Method, images: Iterable[LoadedImage]) -> list[float]:
    """Dense-map peaks of held-out normal images, when fitting with the dense map (their
    own mask level: the finer map reaches higher on normal texture too)."""
    if not detector.dense_map:
        return []
    predictions = detector.pipeline(method, dense=True).predict_images(images)
    return [float(p.score_map.max()) for p in predictions]


def left_out_results(
    detector: Detector, readable: Sequence[ImageInput], views: int = 1
) -> tuple[NormalResults, list[float]]:
    """Image score and map peak (and with the dense map, its peak) of up to
    `CALIBRATION_MAX` evenly spaced images of the fit, each scored by the fitted method
    as if left out; `readable` are the fit's images in the order the method saw them, each
    of which gave it `views` grids."""
    step = math.ceil(len(readable) / CALIBRATION_MAX)
    positions = range(0, len(readable), step)
    chosen = [readable[p] for p in positions]
    pairs = zip(positions, decoded_ahead(chosen, detector.decode_side), strict=True)
    usable = ((p, item) for p, item in pairs if not isinstance(item, ImageLoadError))
    bar = tqdm(total=len(positions), desc="calibrate", unit="img", disable=not detector.progress)
    backbone, maps, method = detector.backbone_model(), detector.map_settings(), detector.method_
    results, peaks = [], []
    while window := list(itertools.islice(usable, detector.batch_size)):
        where, pixels = [p for p, _ in window], [item.image for _, item in window]
        plain = backbone.features(pixels, batch_size=detector.batch_size)
        results += normal_results(detector, method, method.score_left_out(plain, where, views))
        if detector.dense_map:
            dense = backbone.features(pixels, dense=True, batch_size=detector.batch_size)
            for scores in method.score_left_out(dense, where, views):
                peaks.append(float(maps.shown_map(scores.patches, True).max()))
        bar.update(len(window))
    bar.close()
    return results, peaks


def held_out_results(
    detector: Detector, held: Sequence[ImageInput]
) -> tuple[NormalResults, list[float]]:
    """Image scores and map peaks (and dense-map peaks) of held-out normal images, scored by
    the fitted method."""
    method = detector.method_
    scores = method.score_held_out(grids(detector, decoded(detector, held, "hold-out")))
    peaks = dense_peaks(detector, method, decoded(detector, held, "dense maps", record=False))
    return normal_results(detector, method, scores), peaks


def leave_one_out_results(
    detector: Detector, references: list[LoadedImage], few_shot: bool
) -> tuple[NormalResults, list[float]]:
    """Image score and map peak of each reference scored against a model of the others,
    and with the dense map its dense-map peak."""
    if len(references) < 2:
        return [], []
    views = [list(bank_grids(detector, [r], few_shot)) for r in references]
    results, peaks = [], []
    for i, reference in enumerate(references):
        method = new_method(detector, few_shot)
        try:
            method.fit(g for j, grids_of in enumerate(views) if j != i for g in grids_of)
        except ValueError as error:  # e.g. too few images left for a Gaussian
            log.warning("no leave-one-out score for %s: %s", reference.name, error)
            continue
        results += normal_results(detector, method, method.score_batch([views[i][0]]))
        peaks += dense_peaks(detector, method, [reference])
    return results, peaks


def unreadable_error(detector: Detector) -> ValueError:
    return ValueError("none of the normal images could be read: " + "; ".join(detector.skipped_))


def _fit_from(detector: Detector, images: Iterator[LoadedImage], few_shot: bool) -> None:
    """Fit the detector's method on `images`, refusing a set where none was readable."""
    first = next(images, None)
    if first is None:
        raise unreadable_error(detector)
    detector.method_.fit(bank_grids(detector, itertools.chain([first], images), few_shot))


def fit(
    detector: Detector, normal: ImageInput | Sequence[ImageInput], calibrate: bool = True
) -> Detector:
    """Fit `detector` on normal images by the scheme their number and its method allow, then
    set its thresholds (see the module docstring); without `calibrate`, on all of them and
    with no thresholds (scores and maps only, for comparing settings). Where the threshold
    scores the fit's own images again, their backbone outputs are kept in a bounded memo
    for it."""
    sources = expand_inputs(normal)
    if detector.shots is not None:
        if len(sources) < detector.shots:
            raise ValueError(
                f"--shots {detector.shots} needs {detector.shots} images, got {len(sources)}"
            )
        sources = sources[: detector.shots]
    if not sources:
        raise ValueError("no normal images given")
    few_shot = detector.shots is not None
    fused = KNNGaussianFusion.name
    if detector.active_setting.method == fused and (
        few_shot or len(sources) < MIN_IMAGES_FOR_HOLDOUT or not calibrate
    ):
        raise ValueError(
            f"method {fused} needs at least {MIN_IMAGES_FOR_HOLDOUT} normal images, no "
            "--shots and a calibrated fit: it standardises its two scores on held-out normal "
            "images; use patchknn for few-shot"
        )
    detector.skipped_ = []
    detector.input_sizes_ = Counter()
    detector.method_ = new_method(detector, few_shot)
    enough = len(sources) >= MIN_IMAGES_FOR_HOLDOUT
    if not calibrate:
        _fit_from(detector, decoded(detector, sources, "fit"), few_shot)
        return finish(detector, len(sources), [], [], UNCALIBRATED)
    repeated = ForwardMemo().attached(detector.backbone_model())  # the same images, twice
    if enough and detector.method_.leaves_out:
        readable: list[ImageInput] = []
        with repeated:
            _fit_from(detector, decoded(detector, sources, "fit", readable=readable), few_shot)
            views = views_per_image(detector, few_shot)
            results, peaks = left_out_results(detector, readable, views)
        scheme = "each scored against the bank without its own patches"
    elif enough and not few_shot:
        bank, held = held_out_split(sources)
        _fit_from(detector, decoded(detector, bank, "fit"), few_shot)
        results, peaks = held_out_results(detector, held)
        scheme = "every 10th held out of the bank"
    else:
        references = list(decoded(detector, sources, "fit"))
        if not references:
            raise unreadable_error(detector)
        with repeated:
            results, peaks = leave_one_out_results(detector, references, few_shot)
            detector.method_.fit(bank_grids(detector, references, few_shot))
        scheme = "each left out of a model of the others"
    return finish(detector, len(sources), results, peaks, scheme)


def finish(
    detector: Detector,
    n_sources: int,
    results: NormalResults,
    peaks: list[float],
    scheme: str,
) -> Detector:
    """The end of every fit, once `method_`, `skipped_` and `input_sizes_` are set: the
    counts, and the thresholds from the normal images' results."""
    detector.n_train_ = n_sources - len(detector.skipped_)
    common = detector.input_sizes_.most_common(1)
    detector.input_size_ = list(common[0][0]) if common else None
    found = thresholds_from(results, peaks, scheme, detector.fpr, detector.threshold)
    detector.normal_scores_ = found.normal_scores
    detector.calibration_ = found.calibration
    detector.threshold_ = found.threshold
    detector.threshold_source_ = found.source
    detector.pixel_threshold_ = found.pixel_threshold
    detector.dense_pixel_threshold_ = found.dense_pixel_threshold
    return detector
