"""`Detector`: fit on normal images, predict scores, decisions, maps and masks; save and load.

A thin facade: features come from `backbones`, the fit and its thresholds from `fitting`,
predictions from `pipeline`, zero-shot scoring from `zero_shot`, model folders from `saving`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from normalcy import __version__, fitting, saving
from normalcy.backbones import Backbone, create_backbone, resolve_device, resolve_precision
from normalcy.backbones.memo import ForwardMemo
from normalcy.data import ImageInput, ImageLoadError
from normalcy.inputs import LoadedImage, expand_inputs
from normalcy.methods.base import Method
from normalcy.methods.golden import GoldenTemplate
from normalcy.methods.mutual import MutualScorer
from normalcy.pipeline import MapSettings, Pipeline
from normalcy.prediction import Prediction, gathered
from normalcy.selection import MIN_IMAGES, Selection, select_setting
from normalcy.setting import AUTO, DEFAULT, SETTINGS, Setting, resolve_setting
from normalcy.zero_shot import zero_shot

log = logging.getLogger("normalcy")

MUTUAL = MutualScorer.name
GOLDEN = GoldenTemplate.name
# Up to this many normal images, few-shot mode (every image in the bank, augmented) is chosen.
FEW_SHOT_MAX = 16
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


def check_params(
    setting: Setting | str,
    shots: int | None,
    fpr: float,
    batch_size: int,
    dense_map: bool,
    precision: str,
    device: str,
    max_ms_per_image: float | None,
    **_: Any,
) -> None:
    """Refuse what cannot work with the setting (checked itself by `Setting`), naming it,
    before any long work starts."""
    if max_ms_per_image is not None and not max_ms_per_image > 0:
        raise ValueError(f"max_ms_per_image must be positive, got {max_ms_per_image}")
    if isinstance(setting, Setting):  # AUTO: each candidate is checked when made
        if setting.method == GOLDEN and dense_map:
            raise ValueError(
                "golden templates compare grids of the references' shape: no dense map"
            )
        if setting.tile_scale is not None and dense_map:
            raise ValueError("the dense map is not available with tiles")
        if setting.method == GOLDEN and shots is not None:
            raise ValueError(
                "golden templates compare each image with every reference as it is, aligned: "
                "give the references without --shots (they are not augmented)"
            )
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    resolve_precision(precision)  # an unknown name
    resolve_device(device)  # an unknown or absent device


class Detector:
    """Anomaly detector over frozen backbone features.

    setting: what decides features and scores (backbone, input size or tiles, layers, method,
        map making): "auto" (the default): `fit` chooses among `selection.CANDIDATES` by how
        well each finds defects planted into normal images it did not fit on (see
        `normalcy.selection`; with fewer than 6 images or few-shot, the default setting);
        or a `Setting`, or the name of one in `normalcy.setting.SETTINGS` ("default":
        DINOv2 at 224 px, patch kNN). Keyword arguments named after its fields (`backbone=`,
        `image_size=`, `method=`, `tile_scale=`, ...) change those fields (and pin "auto"
        to the default setting, changed).
    max_ms_per_image: with "auto", the slowest predict per image (from the file, measured on
        this machine during the choice) a chosen setting may have; None: no limit.
    shots: few-shot mode; None uses every normal image given to `fit`.
    augment: in few-shot mode, add rotated and mirrored views of the references.
    fpr: target false-positive rate on held-out normal images for the decision threshold.
    threshold: a fixed image-score threshold instead (overrides fpr).
    scorer: the zero-shot scorer for method "mutual" (default: `MutualScorer` in `precision`).
    dense_map: draw maps from a half-stride grid (three more shifted backbone passes and four
        times the patches searched, about 4x the predict time) for finer outlines; image
        scores, decisions and the fit are the same either way, so it may be switched on a
        fitted or loaded detector.
    precision: the arithmetic of the backbone and the nearest-neighbour search: "float32",
        "bfloat16", or "auto" (bfloat16 where the device has bfloat16 instructions, where it
        is faster; float32 elsewhere). The search re-measures its candidates in float32.
    device: "auto" (CUDA, then MPS, then the CPU), "cpu", "cuda", "cuda:N" or "mps": where
        the backbone, the search and the maps run. A saved model loads on any device.
    """

    def __init__(
        self,
        setting: str | Setting = AUTO,
        shots: int | None = None,
        augment: bool = True,
        fpr: float = 0.01,
        threshold: float | None = None,
        batch_size: int = 8,
        weights: str | os.PathLike | None = None,
        progress: bool = False,
        seed: int = 0,
        scorer: MutualScorer | None = None,
        dense_map: bool = False,
        precision: str = "auto",
        device: str = "auto",
        max_ms_per_image: float | None = None,
        **changes: Any,
    ) -> None:
        params = {
            name: value for name, value in locals().items() if name not in ("self", "changes")
        }
        params["setting"] = resolve_setting(setting, changes)
        check_params(**params)
        # Parameters, one attribute each (scikit-learn's convention); the setting resolved.
        vars(self).update(params)

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters: `Detector(**d.get_params())` is an unfitted copy (how
        workers of a distributed fit rebuild it)."""
        names = inspect.signature(Detector.__init__).parameters
        return {name: getattr(self, name) for name in names if name not in ("self", "changes")}

    @property
    def active_setting(self) -> Setting:
        """The setting in use: the one given, or the one `fit` chose for "auto" (before that
        fit, and for zero-shot scoring, which has no normal images to choose with: the
        default)."""
        if isinstance(self.setting, Setting):
            return self.setting
        return getattr(self, "chosen_setting_", None) or DEFAULT

    # ----------------------------------------------------------------- features
    def backbone_model(self) -> Backbone:
        """The feature extractor in this detector's setting (made on first use)."""
        if getattr(self, "backbone_", None) is None:
            setting = self.active_setting
            self.backbone_ = create_backbone(
                setting.backbone,
                setting.image_size,
                setting.layers,
                weights=self.weights,
                context=setting.context_weight,
                precision=self.precision,
                device=self.device,
                tile_scale=setting.tile_scale,
            )
        return self.backbone_

    @property
    def decode_side(self) -> int | None:
        """The short side images are decoded reduced to (None: full size, when tiling)."""
        return self.backbone_model().decode_side

    def map_settings(self) -> MapSettings:
        """How this detector's patch scores become maps and image scores."""
        setting = self.active_setting
        return MapSettings(
            setting.sigma, setting.closing, setting.upsample, self.backbone_model().tile_cells
        )

    def pipeline(self, method: Method | None = None, dense: bool | None = None) -> Pipeline:
        """The predict path for `method` (by default the fitted one) with this detector's
        settings and thresholds. The dense map's masks use its own level where the fit set
        one, else the plain map's (a little larger masks)."""
        dense = self.dense_map if dense is None else dense
        plain_level = getattr(self, "pixel_threshold_", None)
        dense_level = getattr(self, "dense_pixel_threshold_", None)
        return Pipeline(
            backbone=self.backbone_model(),
            method=self.method_ if method is None else method,
            maps=self.map_settings(),
            dense=dense,
            batch_size=self.batch_size,
            threshold=getattr(self, "threshold_", None),
            pixel_threshold=dense_level if dense and dense_level is not None else plain_level,
        )

    # ----------------------------------------------------------------------- fit
    def fit(self, normal: ImageInput | Sequence[ImageInput], calibrate: bool = True) -> Detector:
        """Learn normality from normal images (a folder, paths, arrays or PIL images).

        The threshold is set at the target false-positive rate from normal images scored by
        a model that did not see them (see `fitting`): patch kNN scores every image (up to
        500) against the bank without its own patches; other full-shot methods hold out every
        10th image; below 10 images, or few-shot, the others leave each image out in turn.
        calibrate=False skips that scoring: every image goes into the model and no threshold
        is set (scores and maps only; how settings are compared quickly).
        With setting "auto", the setting is chosen first (`selection_` says how).
        """
        if self.setting != AUTO:
            return fitting.fit(self, normal, calibrate)
        normal = expand_inputs(normal)
        memo = ForwardMemo()  # the candidates' and the final fit's backbone passes, shared
        self.select_setting(normal, memo)
        with memo.attached(self.backbone_model()):
            return fitting.fit(self, normal, calibrate)

    def select_setting(
        self, normal: ImageInput | Sequence[ImageInput], memo: ForwardMemo | None = None
    ) -> Setting:
        """With setting "auto", choose the setting from normal images, as `fit` does first:
        sets `selection_` (None where there is no choice to make: fewer than
        `selection.MIN_IMAGES` images full-shot; the default setting is used) and
        `chosen_setting_`, and returns it. Few-shot, the references are left out in turn.
        The candidates' backbones share `memo`."""
        if self.setting != AUTO:
            raise ValueError(f"the setting is pinned ({self.setting}), not {AUTO!r}")
        self.selection_ = self._select(
            expand_inputs(normal), ForwardMemo() if memo is None else memo
        )
        self.chosen_setting_ = SETTINGS[self.selection_.chosen if self.selection_ else "default"]
        self.backbone_ = None
        return self.chosen_setting_

    def _select(self, normal: Sequence[ImageInput], memo: ForwardMemo) -> Selection | None:
        few_shot = self.shots is not None
        if few_shot:
            normal = normal[: self.shots]
        elif len(normal) < MIN_IMAGES:
            log.info(
                "too few normal images to choose a full-shot setting (at least %d; few-shot "
                "chooses from any number): fitting the default setting",
                MIN_IMAGES,
            )
            return None
        params = {**self.get_params(), "progress": False}

        def make(setting: Setting, **changes: Any) -> Detector:
            detector = Detector(**{**params, **changes, "setting": setting})
            detector.backbone_model().memo = memo
            return detector

        selection = select_setting(
            normal,
            make,
            tiles=not self.dense_map,  # the dense map needs the whole image in one pass
            memo=memo,
            max_ms_per_image=self.max_ms_per_image,
            seed=self.seed,
            progress=self.progress,
            few_shot=few_shot,
        )
        log.info("setting %s chosen:\n%s", selection.chosen, selection.table())
        return selection

    def zero_shot(
        self, inputs: ImageInput | Sequence[ImageInput]
    ) -> list[Prediction | ImageLoadError]:
        """Score unlabelled images against each other (method "mutual"); needs no fit.

        One result per input, in order; unreadable inputs give their error instead. Without
        normal references there is no false-positive rate to set a threshold from, so
        decisions are made only with a user threshold (`threshold=`).
        """
        return zero_shot(self, inputs)

    def mutual_scorer(self) -> MutualScorer:
        """The zero-shot scorer: `scorer`, or the default one in this detector's settings."""
        return self.scorer or MutualScorer(
            precision=self.precision, sigma=self.active_setting.sigma
        )

    # ------------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if getattr(self, "method_", None) is None:
            raise RuntimeError("this Detector is not fitted: call fit() or Detector.load()")

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
        return self.pipeline()

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

    def set_threshold(self, threshold: float) -> None:
        """Fix the image-score threshold (for example from a user's choice)."""
        self.threshold_ = float(threshold)
        self.threshold_source_ = "user"

    # -------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model folder (see `modelfile`: atomic, never absent, user files kept)."""
        self._check_fitted()
        return saving.save_detector(self, path)

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
        return saving.load_detector(cls, path, weights, device, precision)

    def describe(self) -> dict[str, Any]:
        """What the service lists about a model."""
        return {
            "backbone": self.active_setting.backbone,
            "method": self.active_setting.method,
            "shots": self.shots,
            "threshold": self.threshold_,
            "image_size": self.active_setting.image_size,
            "version": getattr(self, "normalcy_version_", __version__),
            "runtime": "torch",
        }
