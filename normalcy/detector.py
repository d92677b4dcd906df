"""`Detector`: fit on normal images, predict scores, decisions, maps and masks; save and load."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from normalcy import __version__
from normalcy.backbones import (
    MAX_IMAGE_SIZE,
    Backbone,
    create_backbone,
    resolve_device,
    resolve_precision,
)
from normalcy.calibration import CALIBRATION_MAX, Calibration, conformal_threshold
from normalcy.data import (
    ImageInput,
    ImageLoadError,
    LoadedImage,
    decoded_ahead,
    expand_inputs,
)
from normalcy.methods import create_method, method_from_state
from normalcy.methods.base import GridScores, Method
from normalcy.methods.fused import KNNGaussianFusion
from normalcy.methods.golden import GoldenTemplate
from normalcy.methods.mutual import MutualScorer, content_key
from normalcy.modelfile import (
    MAX_CLOSING,
    MAX_CONTEXT,
    MAX_TILE_SCALE,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    ModelFileError,
    read_model,
    save_model,
)
from normalcy.pipeline import MapSettings, Pipeline, feature_grids
from normalcy.postprocess import SIGMA_AT_256
from normalcy.prediction import Prediction, gathered

log = logging.getLogger("normalcy")

# Below this many normal images, hold out by leave-one-out rather than a fixed split.
MIN_IMAGES_FOR_HOLDOUT = 10
HOLDOUT_EVERY = 10  # every 10th normal image (by sorted name) is held out for the threshold
MUTUAL = MutualScorer.name
GOLDEN = GoldenTemplate.name
FUSED = KNNGaussianFusion.name
# Up to this many normal images, few-shot mode (every image in the bank, augmented) is chosen.
FEW_SHOT_MAX = 16
# Weight of the image-context half of each patch descriptor (see `aggregate`) when the user
# gives none: equal to the appearance half for patch kNN, off for the methods it was not
# measured with.
DEFAULT_CONTEXT = {"patchknn": 1.0, FUSED: 1.0}
ZERO_SHOT_HINT = (
    "with no normal images, score a batch of images against each other instead: "
    "normalcy predict --zero-shot INPUT_DIR -o OUT"
)


def choose_setting(n_normal: int) -> tuple[str, int | None]:
    """Method and shots for the number of normal images a user has: 1-16 few-shot patch kNN
    (each image matters, so all are kept and augmented), more full-shot patch kNN."""
    if n_normal < 1:
        raise ValueError("no normal images to fit; " + ZERO_SHOT_HINT)
    return "patchknn", (n_normal if n_normal <= FEW_SHOT_MAX else None)


def held_out_split(sources: Sequence[ImageInput]) -> tuple[list, list]:
    """(bank, held out): every `HOLDOUT_EVERY`-th normal image is held out for the threshold."""
    held = [i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for i in range(len(sources))]
    return (
        [s for s, out in zip(sources, held, strict=True) if not out],
        [s for s, out in zip(sources, held, strict=True) if out],
    )


def augmentations(image: np.ndarray) -> list[np.ndarray]:
    """The image, its 90/180/270-degree rotations and their mirror images (8 views).

    Few-shot references gain the pose variety a handful of images lacks (AnomalyDINO).
    """
    rotations = [np.rot90(image, k) for k in range(4)]
    return [np.ascontiguousarray(v) for r in rotations for v in (r, r[:, ::-1])]


class Detector:
    """Anomaly detector over frozen backbone features.

    backbone, image_size, layers: the feature extractor (short side resized to image_size).
    method: "patchknn" (nearest normal patch), "gaussian" (Mahalanobis distance),
        "patchknn+gaussian" (both, standardised on held-out normal images and averaged;
        full-shot only), or "mutual" (zero-shot: no fit, use `zero_shot`).
    shots: few-shot mode; None uses every normal image given to `fit`.
    augment: in few-shot mode, add rotated and mirrored views of the references.
    fpr: target false-positive rate on held-out normal images for the decision threshold.
    threshold: a fixed image-score threshold instead (overrides fpr).
    scorer: the zero-shot scorer for method "mutual" (default: `MutualScorer` in `precision`).
    context: weight of each patch's difference from its image's median patch, appended to
        its features (0 = off; None: 1 for the patch-kNN methods, 0 for the others).
    dense_map: draw maps from a half-stride grid (three more shifted backbone passes and four
        times the patches searched, about 4x the predict time) for finer outlines; image
        scores, decisions and the fit are the same either way, so it may be switched on a
        fitted or loaded detector.
    closing: width in patches of the grey-level closing applied to patch scores before they
        become a map (1 = off): fills the inside of broad defects that light up only at their
        outline. Maps and masks only; image scores come from the unfilled map.
    upsample: how patch scores are upsampled into the map users see, "bicubic" (sharper
        peaks between patch centres: small defects outlined more tightly) or "bilinear".
        Maps and masks only; image scores always come from the bilinear map.
    precision: the arithmetic of the backbone and the nearest-neighbour search: "float32",
        "bfloat16", or "auto" (bfloat16 where the device has bfloat16 instructions, where it
        is faster; float32 elsewhere). The search re-measures its candidates in float32.
    low_variance_fraction: gaussian only: keep only the principal components of smallest
        variance that hold this share of the variance (Rippel et al.); None keeps all.
    device: "auto" (CUDA, then MPS, then the CPU), "cpu", "cuda", "cuda:N" or "mps": where
        the backbone, the search and the maps run. A saved model loads on any device.
    """

    def __init__(
        self,
        backbone: str = "dinov2_vits14",
        method: str = "patchknn",
        image_size: int = 224,
        layers: Sequence[int] | None = None,
        shots: int | None = None,
        augment: bool = True,
        coreset_ratio: float = 0.1,
        max_bank_size: int = 10_000,
        fpr: float = 0.01,
        threshold: float | None = None,
        sigma: float = SIGMA_AT_256,
        batch_size: int = 8,
        weights: str | os.PathLike | None = None,
        progress: bool = False,
        seed: int = 0,
        scorer: MutualScorer | None = None,
        context: float | None = None,
        dense_map: bool = False,
        closing: int = 3,
        upsample: str = "bicubic",
        precision: str = "auto",
        low_variance_fraction: float | None = None,
        device: str = "auto",
        tile_scale: float | None = None,
    ) -> None:
        if not 1 <= image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be from 1 to {MAX_IMAGE_SIZE}, got {image_size}")
        if tile_scale is not None and not 0 < tile_scale <= MAX_TILE_SCALE:
            raise ValueError(
                f"tile_scale must be in (0, {MAX_TILE_SCALE}] or None, got {tile_scale}"
            )
        if method == GOLDEN and dense_map:
            raise ValueError(
                "golden templates compare grids of the references' shape: no dense map"
            )
        if tile_scale is not None and dense_map:
            raise ValueError("the dense map is not available with tiles")
        if method == GOLDEN and shots is not None:
            raise ValueError(
                "golden templates compare each image with every reference as it is, aligned: "
                "give the references without --shots (they are not augmented)"
            )
        if shots is not None and shots < 1:
            raise ValueError(f"shots must be at least 1, got {shots}")
        if not 0 <= fpr < 1:
            raise ValueError(f"fpr must be in [0, 1), got {fpr}")
        if context is not None and not 0 <= context <= MAX_CONTEXT:
            raise ValueError(f"context must be from 0 to {MAX_CONTEXT}, got {context}")
        if not 1 <= closing <= MAX_CLOSING:
            raise ValueError(
                f"closing must be at least 1 patch (1 = off), at most {MAX_CLOSING}, got {closing}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        MapSettings(sigma, closing, upsample)  # refuses an unknown upsampling before a fit
        resolve_precision(precision)  # refuses an unknown name before a long fit
        resolve_device(device)  # refuses an unknown or absent device before a long fit
        if low_variance_fraction is not None:
            if method != "gaussian":
                raise ValueError(
                    f"low_variance_fraction is an option of the gaussian method, not {method!r}"
                )
            # refuses a fraction outside (0, 1] before a long fit
            create_method(method, low_variance_fraction=low_variance_fraction)
        self.backbone = backbone
        self.method = method
        self.image_size = image_size
        self.layers = tuple(layers) if layers else None
        self.shots = shots
        self.augment = augment
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.fpr = fpr
        self.threshold = threshold
        self.sigma = sigma
        self.batch_size = batch_size
        self.weights = weights
        self.progress = progress
        self.seed = seed
        self.scorer = scorer
        self.context = context
        self.dense_map = dense_map
        self.closing = closing
        self.upsample = upsample
        self.precision = precision
        self.low_variance_fraction = low_variance_fraction
        self.device = device
        self.tile_scale = tile_scale

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters, as given: `Detector(**d.get_params())` is an unfitted
        copy (how workers of a distributed fit rebuild it)."""
        names = inspect.signature(Detector.__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    # ----------------------------------------------------------------- features
    def _backbone(self) -> Backbone:
        if getattr(self, "backbone_", None) is None:
            self.backbone_ = create_backbone(
                self.backbone,
                self.image_size,
                self.layers,
                weights=self.weights,
                context=DEFAULT_CONTEXT.get(self.method, 0.0)
                if self.context is None
                else self.context,
                precision=self.precision,
                device=self.device,
                tile_scale=self.tile_scale,
            )
        return self.backbone_

    @property
    def decode_side(self) -> int | None:
        """The short side images are decoded reduced to (None: full size, when tiling)."""
        return self._backbone().decode_side

    def map_settings(self) -> MapSettings:
        """How this detector's patch scores become maps and image scores."""
        return MapSettings(self.sigma, self.closing, self.upsample, self._backbone().tile_cells)

    def _pipeline(self, method: Method | None = None, dense: bool | None = None) -> Pipeline:
        """The predict path for `method` (by default the fitted one) with this detector's
        settings and thresholds. The dense map's masks use its own level where the fit set
        one, else the plain map's (a little larger masks)."""
        dense = self.dense_map if dense is None else dense
        plain_level = getattr(self, "pixel_threshold_", None)
        dense_level = getattr(self, "dense_pixel_threshold_", None)
        return Pipeline(
            backbone=self._backbone(),
            method=self.method_ if method is None else method,
            maps=self.map_settings(),
            dense=dense,
            batch_size=self.batch_size,
            threshold=getattr(self, "threshold_", None),
            pixel_threshold=dense_level if dense and dense_level is not None else plain_level,
        )

    def _predictor(self) -> Pipeline:
        """The fitted detector's predict path; says once when its dense-map masks borrow the
        plain map's level."""
        self._check_fitted()
        borrowed = self.dense_map and getattr(self, "dense_pixel_threshold_", None) is None
        if borrowed and self.pixel_threshold_ is not None and not getattr(self, "_warned", False):
            log.warning(
                "this model was fitted without the dense map: its masks use the plain map's "
                "level, set on held-out normal images (fit with --dense-map to set their own)"
            )
            self._warned = True
        return self._pipeline()

    def _grids(self, images: Iterable[LoadedImage]) -> Iterator[torch.Tensor]:
        """Plain feature grids, computed a batch at a time so memory stays bounded."""
        for _, grids in feature_grids(self._backbone(), images, self.batch_size):
            yield from grids

    def _loaded(
        self,
        sources: Sequence[ImageInput],
        what: str,
        record: bool = True,
        readable: list[ImageInput] | None = None,
    ) -> Iterator[LoadedImage]:
        """Decoded images (ahead, in a thread); a broken file is logged by name and skipped,
        never fatal (`record`: and listed in `skipped_`, once per fit; `readable`: the
        sources of the images yielded are appended to it, in order)."""
        bar = tqdm(total=len(sources), desc=what, unit="img", disable=not self.progress)
        self.skipped_: list[str] = getattr(self, "skipped_", [])
        self.input_sizes_: Counter[tuple[int, int]] = getattr(self, "input_sizes_", Counter())
        backbone = self._backbone()
        for source, item in zip(sources, decoded_ahead(sources, self.decode_side), strict=True):
            bar.update()
            if isinstance(item, ImageLoadError):
                if record:
                    log.warning("skipped %s", item)
                    self.skipped_.append(str(item))
            else:
                if record:
                    self.input_sizes_[backbone.network_size(*item.size)] += 1
                if readable is not None:
                    readable.append(source)
                yield item
        bar.close()

    # ----------------------------------------------------------------------- fit
    def _new_method(self, few_shot: bool) -> Method:
        if self.method == MUTUAL:
            raise ValueError(
                "the mutual method is zero-shot: it needs no fit; call zero_shot(images) "
                "(CLI: normalcy predict --zero-shot INPUT_DIR -o OUT)"
            )
        if self.method == "gaussian":
            return create_method(self.method, low_variance_fraction=self.low_variance_fraction)
        if self.method == GOLDEN:
            return create_method(self.method)
        ratio = 1.0 if few_shot else self.coreset_ratio
        extra = {"context_half": self._backbone().context > 0} if self.method == FUSED else {}
        return create_method(
            self.method,
            coreset_ratio=ratio,
            max_bank_size=self.max_bank_size,
            seed=self.seed,
            precision=self.precision,
            **extra,
        )

    def _views(self, image: np.ndarray, few_shot: bool) -> list[np.ndarray]:
        return augmentations(image) if few_shot and self.augment else [image]

    def _bank_grids(self, images: Iterable[LoadedImage], few_shot: bool) -> Iterator[torch.Tensor]:
        views = (
            LoadedImage(item.name, view)
            for item in images
            for view in self._views(item.image, few_shot)
        )
        yield from self._grids(views)

    def fit(self, normal: ImageInput | Sequence[ImageInput]) -> Detector:
        """Learn normality from normal images (a folder, paths, arrays or PIL images).

        The threshold is set at the target false-positive rate from normal images scored by
        a model that did not see them (see `calibration`): full-shot patch kNN scores every
        image (up to 500) against the bank without its own patches; other methods hold out
        every 10th image; below 10 images each is left out in turn.
        """
        sources = expand_inputs(normal)
        if self.shots is not None:
            if len(sources) < self.shots:
                raise ValueError(
                    f"--shots {self.shots} needs {self.shots} images, got {len(sources)}"
                )
            sources = sources[: self.shots]
        if not sources:
            raise ValueError("no normal images given")
        few_shot = self.shots is not None
        if self.method == FUSED and (few_shot or len(sources) < MIN_IMAGES_FOR_HOLDOUT):
            raise ValueError(
                f"method {FUSED} needs at least {MIN_IMAGES_FOR_HOLDOUT} normal images and no "
                "--shots: it standardises its two scores on held-out normal images; "
                "use patchknn for few-shot"
            )
        self.skipped_ = []
        self.input_sizes_ = Counter()
        self.method_ = self._new_method(few_shot)
        if len(sources) >= MIN_IMAGES_FOR_HOLDOUT and self.method_.leaves_out and not few_shot:
            readable: list[ImageInput] = []
            images = self._loaded(sources, "fit", readable=readable)
            first = next(images, None)
            if first is None:
                raise self._unreadable_error()
            self.method_.fit(self._bank_grids(itertools.chain([first], images), few_shot))
            normal, dense_peaks = self._left_out_results(readable)
            scheme = "each scored against the bank without its own patches"
        elif len(sources) >= MIN_IMAGES_FOR_HOLDOUT:
            bank, held = held_out_split(sources)
            bank_images = self._loaded(bank, "fit")
            first = next(bank_images, None)
            if first is None:
                raise self._unreadable_error()
            self.method_.fit(self._bank_grids(itertools.chain([first], bank_images), few_shot))
            held_scores = self.method_.score_held_out(self._grids(self._loaded(held, "hold-out")))
            normal = self._normal_results(self.method_, held_scores)
            dense_peaks = self._dense_peaks(self.method_, self._loaded(held, "dense maps", False))
            scheme = "every 10th held out of the bank"
        else:
            references = list(self._loaded(sources, "fit"))
            if not references:
                raise self._unreadable_error()
            normal, dense_peaks = self._leave_one_out_results(references, few_shot)
            self.method_.fit(self._bank_grids(references, few_shot))
            scheme = "each left out of a model of the others"
        return self._fitted(len(sources), normal, dense_peaks, scheme)

    def _fitted(
        self,
        n_sources: int,
        normal: list[tuple[float, float]],
        dense_peaks: list[float],
        scheme: str,
    ) -> Detector:
        """The end of every fit, once `method_`, `skipped_` and `input_sizes_` are set: the
        counts and the thresholds from the normal images' results."""
        self.n_train_ = n_sources - len(self.skipped_)
        common = self.input_sizes_.most_common(1)
        self.input_size_ = list(common[0][0]) if common else None
        self._set_thresholds(normal, dense_peaks, scheme)
        return self

    def _left_out_results(
        self, readable: Sequence[ImageInput]
    ) -> tuple[list[tuple[float, float]], list[float]]:
        """Image score and map peak (and with the dense map, its peak) of up to
        `CALIBRATION_MAX` evenly spaced images of the fit, each scored by the fitted method
        as if left out; `readable` are the fit's images in the order the method saw them."""
        step = math.ceil(len(readable) / CALIBRATION_MAX)
        positions = range(0, len(readable), step)
        chosen = [readable[p] for p in positions]
        decoded = zip(positions, decoded_ahead(chosen, self.decode_side), strict=True)
        usable = ((p, item) for p, item in decoded if not isinstance(item, ImageLoadError))
        bar = tqdm(total=len(positions), desc="calibrate", unit="img", disable=not self.progress)
        backbone, maps = self._backbone(), self.map_settings()
        results, dense_peaks = [], []
        while window := list(itertools.islice(usable, self.batch_size)):
            where, pixels = [p for p, _ in window], [item.image for _, item in window]
            grids = backbone.features(pixels, batch_size=self.batch_size)
            results += self._normal_results(self.method_, self.method_.score_left_out(grids, where))
            if self.dense_map:
                dense = backbone.features(pixels, dense=True, batch_size=self.batch_size)
                for scores in self.method_.score_left_out(dense, where):
                    dense_peaks.append(float(maps.shown_map(scores.patches, True).max()))
            bar.update(len(window))
        bar.close()
        return results, dense_peaks

    def _normal_results(
        self, method: Method, scores: Iterable[GridScores]
    ) -> list[tuple[float, float]]:
        """Image score and map peak of each normal image that no bank has seen."""
        pipeline = self._pipeline(method, dense=False)
        predictions = (pipeline.prediction("", (1, 1), s) for s in scores)
        return [(p.score, float(p.score_map.max())) for p in predictions]

    def _dense_peaks(self, method: Method, images: Iterable[LoadedImage]) -> list[float]:
        """Dense-map peaks of held-out normal images, when fitting with the dense map (their
        own mask level: the finer map reaches higher on normal texture too)."""
        if not self.dense_map:
            return []
        predictions = self._pipeline(method, dense=True).predict_images(images)
        return [float(p.score_map.max()) for p in predictions]

    def _unreadable_error(self) -> ValueError:
        return ValueError("none of the normal images could be read: " + "; ".join(self.skipped_))

    def _leave_one_out_results(
        self, references: list[LoadedImage], few_shot: bool
    ) -> tuple[list[tuple[float, float]], list[float]]:
        """Image score and map peak of each reference scored against a model of the others,
        and with the dense map its dense-map peak."""
        if len(references) < 2:
            return [], []
        grids = [list(self._bank_grids([r], few_shot)) for r in references]
        results, dense_peaks = [], []
        for i, reference in enumerate(references):
            method = self._new_method(few_shot)
            try:
                method.fit(g for j, views in enumerate(grids) if j != i for g in views)
            except ValueError as error:  # e.g. too few images left for a Gaussian
                log.warning("no leave-one-out score for %s: %s", reference.name, error)
                continue
            results += self._normal_results(method, method.score_batch([grids[i][0]]))
            dense_peaks += self._dense_peaks(method, [reference])
        return results, dense_peaks

    def _set_thresholds(
        self, normal: list[tuple[float, float]], dense_peaks: list[float], scheme: str
    ) -> None:
        scores = np.array([score for score, _ in normal])
        peaks = np.array([peak for _, peak in normal])
        self.normal_scores_ = scores
        self.calibration_ = Calibration.of(len(scores), scheme)
        if self.threshold is None and len(scores) and self.fpr < self.calibration_.min_fpr:
            log.warning(
                "%d normal images can promise a false-positive rate of %.3g at best, not the "
                "%.3g asked for; the threshold is the highest of their scores. Give at least "
                "%d normal images for that rate.",
                len(scores),
                self.calibration_.min_fpr,
                self.fpr,
                math.ceil(1 / self.fpr) if self.fpr > 0 else 0,
            )
        if self.threshold is not None:
            self.threshold_ = float(self.threshold)
            self.threshold_source_ = "user"
        elif len(scores):
            self.threshold_ = conformal_threshold(scores, self.fpr)
            self.threshold_source_ = f"fpr {self.fpr} on {len(scores)} normal images, {scheme}"
        else:
            self.threshold_ = None
            self.threshold_source_ = "none"
            log.warning(
                "no held-out normal image could be scored (one image leaves none to hold out): "
                "no decision threshold is set; pass threshold= (CLI --threshold) or give more "
                "normal images"
            )
        # Masks: the pixel level that the same share of held-out normal images never reach.
        self.pixel_threshold_ = conformal_threshold(peaks, self.fpr) if len(peaks) else None
        self.dense_pixel_threshold_ = (
            conformal_threshold(np.array(dense_peaks), self.fpr) if dense_peaks else None
        )

    # ------------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "method_"):
            raise RuntimeError("this Detector is not fitted: call fit() or Detector.load()")

    def zero_shot(
        self, inputs: ImageInput | Sequence[ImageInput]
    ) -> list[Prediction | ImageLoadError]:
        """Score unlabelled images against each other (method "mutual"); needs no fit.

        One result per input, in order; unreadable inputs give their error instead. Without
        normal references there is no false-positive rate to set a threshold from, so
        decisions are made only with a user threshold (`threshold=`).
        """
        if self.method != MUTUAL:
            raise ValueError(f"zero-shot scoring uses method {MUTUAL!r}, not {self.method!r}")
        sources = expand_inputs(inputs)
        results: list[Prediction | ImageLoadError | None] = []
        readable: list[tuple[int, str, tuple[int, int]]] = []
        scorer = self.mutual_scorer()
        # Sets larger than one sub-batch are split by the decoded pixels' content.
        keys: list[bytes] | None = [] if len(sources) > scorer.max_peers else None
        bar = tqdm(total=len(sources), desc="features", unit="img", disable=not self.progress)

        def decoded() -> Iterator[LoadedImage]:
            """The readable images, their places noted; errors kept in their places."""
            for item in decoded_ahead(sources, self.decode_side):
                bar.update()
                if isinstance(item, ImageLoadError):
                    log.warning("skipped %s", item)
                    results.append(item)
                    continue
                readable.append((len(results), item.name, item.size))
                if keys is not None:
                    keys.append(content_key(item.image))
                results.append(None)
                yield item

        grids = [
            grid
            for _, window in feature_grids(self._backbone(), decoded(), self.batch_size)
            for grid in window
        ]
        bar.close()
        blocks = scorer.n_blocks(grids, keys)
        bar = tqdm(total=blocks, desc="mutual", unit="block", disable=not self.progress)
        scores = scorer.score_batch(grids, on_block=bar.update, keys=keys)
        bar.close()
        self.threshold_ = self.threshold
        pipeline = self._pipeline(scorer, dense=False)
        for (position, name, size), grid_scores in zip(readable, scores, strict=True):
            results[position] = pipeline.prediction(name, size, grid_scores)
        return results  # type: ignore[return-value]

    def mutual_scorer(self) -> MutualScorer:
        """The zero-shot scorer: `scorer`, or the default one in this detector's settings."""
        return self.scorer or MutualScorer(precision=self.precision, sigma=self.sigma)

    def predict_images(self, images: Iterable[LoadedImage]) -> Iterator[Prediction]:
        """Predictions for already decoded images, in order."""
        return self._predictor().predict_images(images)

    def predict_iter(
        self, inputs: ImageInput | Sequence[ImageInput]
    ) -> Iterator[Prediction | ImageLoadError]:
        """A prediction per input, in order; unreadable inputs yield their error instead.

        Only scores and decisions are computed here; a prediction's `anomaly_map` and `mask`
        are made when first read.
        """
        pipeline = self._predictor()
        sources = expand_inputs(inputs)
        bar = tqdm(total=len(sources), desc="predict", unit="img", disable=not self.progress)
        yield from pipeline.predict(sources, on_image=bar.update)
        bar.close()

    def predict(self, x: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Prediction for one image, or a list for several (a folder, a list, a 4-D array).

        Raises ImageLoadError naming the input when an image cannot be read; use
        `predict_iter` to skip bad images instead.
        """
        return gathered(self.predict_iter(x), x)

    def score(self, x: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Image anomaly scores (higher is more anomalous)."""
        results = self.predict(x)
        results = results if isinstance(results, list) else [results]
        return np.array([r.score for r in results])

    # -------------------------------------------------------------- save / load
    def _config(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "normalcy_version": __version__,
            "backbone": {
                "name": self.backbone,
                "image_size": self.image_size,
                "layers": list(self.backbone_.layers),
                "pool": self.backbone_.pool,
                "context": self.backbone_.context,
                "precision": self.precision,
                "weights_fingerprint": weights_fingerprint(self.backbone_),
                "tile_scale": self.tile_scale,
            },
            "method": {"name": self.method, "params": self.method_.get_params()},
            "shots": self.shots,
            "augment": self.augment,
            "fpr": self.fpr,
            "sigma": self.sigma,
            "dense_map": self.dense_map,
            "closing": self.closing,
            "upsample": self.upsample,
            "threshold": self.threshold_,
            "threshold_source": self.threshold_source_,
            "pixel_threshold": self.pixel_threshold_,
            "dense_pixel_threshold": self.dense_pixel_threshold_,
            "n_train": self.n_train_,
            "input_size": self.input_size_,
            "calibration": None if self.calibration_ is None else self.calibration_.to_json(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model folder (see `modelfile`: atomic, never absent, user files kept)."""
        self._check_fitted()
        arrays = dict(self.method_.arrays())
        arrays["normal_scores"] = np.asarray(self.normal_scores_, dtype=np.float64)
        return save_model(path, self._config(), arrays)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        device: str = "auto",
        precision: str | None = None,
    ) -> Detector:
        """A saved detector on `device` (any device, whichever it was fitted on), computing
        in `precision` (None: as fitted). Every file is validated first; a problem raises
        `ModelFileError` naming the file."""
        config, arrays, arrays_file = read_model(path)
        backbone = config["backbone"]
        method = config["method"]
        params = method["params"]
        if precision is not None and "precision" in params:  # the search's, as the backbone's
            params = {**params, "precision": precision}
        try:
            detector = cls(
                backbone=backbone["name"],
                method=method["name"],
                coreset_ratio=params.get("coreset_ratio", 0.1),
                max_bank_size=params.get("max_bank_size", 10_000),
                seed=params.get("seed", 0),
                image_size=backbone["image_size"],
                layers=backbone["layers"],
                shots=config["shots"],
                augment=config["augment"],
                fpr=config["fpr"],
                sigma=config["sigma"],
                weights=weights,
                context=backbone["context"],
                dense_map=config["dense_map"],
                closing=config["closing"],
                upsample=config["upsample"],
                precision=precision or backbone["precision"],
                low_variance_fraction=params.get("low_variance_fraction"),
                device=device,
                tile_scale=backbone["tile_scale"],
            )
            detector.method_ = method_from_state(method["name"], params, arrays)
            calibration = config["calibration"]
            detector.calibration_ = None if calibration is None else Calibration(**calibration)
        except (TypeError, ValueError) as error:
            raise ModelFileError(arrays_file, str(error)) from None
        detector.normal_scores_ = arrays.get("normal_scores", np.zeros(0))
        detector.threshold_ = config["threshold"]
        detector.threshold_source_ = config["threshold_source"]
        detector.pixel_threshold_ = config["pixel_threshold"]
        detector.dense_pixel_threshold_ = config["dense_pixel_threshold"]
        detector.n_train_ = config["n_train"]
        detector.input_size_ = config["input_size"]
        detector.normalcy_version_ = config.get("normalcy_version")
        detector.backbone_ = create_backbone(
            backbone["name"],
            backbone["image_size"],
            tuple(backbone["layers"]),
            pool=backbone["pool"],
            weights=weights,
            context=detector.context,
            precision=detector.precision,
            device=device,
            tile_scale=detector.tile_scale,
        )
        if weights_fingerprint(detector.backbone_) != backbone["weights_fingerprint"]:
            raise ValueError(
                f"{path} was fitted with other {backbone['name']} weights than the ones found "
                "now; its memory bank would not match these features. Pass the original weights."
            )
        expected = detector.method_.n_features_in_
        found = None if expected is None else detector.backbone_.feature_dims()
        if expected != found:
            raise ModelFileError(
                arrays_file,
                f"holds {expected}-dim features; {backbone['name']} with this config gives {found}",
            )
        return detector

    def describe(self) -> dict[str, Any]:
        """What the service lists about a model."""
        return {
            "backbone": self.backbone,
            "method": self.method,
            "shots": self.shots,
            "threshold": self.threshold_,
            "image_size": self.image_size,
            "version": getattr(self, "normalcy_version_", __version__),
            "runtime": "torch",
        }

    def set_threshold(self, threshold: float) -> None:
        """Fix the image-score threshold (for example from a user's choice)."""
        self.threshold_ = float(threshold)
        self.threshold_source_ = "user"


def weights_fingerprint(backbone: Backbone) -> str:
    """A short hash of every tensor the backbone uses: tells weight sets apart."""
    digest = hashlib.sha256()
    for name, tensor in backbone.network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
