"""Decision thresholds that keep their stated false-positive rate.

A threshold read off the scores of n normal images that no model saw is a split-conformal
bound: taking the ceil((n + 1)(1 - fpr))-th smallest score, a new normal image exceeds it with
probability at most `fpr` (over the draw of calibration images). No threshold from n scores
can promise less than 1 / (n + 1): asked for less, the largest score is used and the promise
is 1 / (n + 1), which `fit` reports and warns about. So every normal image that can be
scored without having been seen should be: patch kNN scores each one against its bank
without that image's own patches (`PatchKNN.score_left_out`), up to `CALIBRATION_MAX`
images; methods that cannot (the Gaussian, which also standardises on them) hold out every
10th image instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger("normalcy")

# Normal images scored for calibration when every one can be: beyond this, an evenly spaced
# subset (500 scores resolve a 1% rate to 5 images above the threshold), so a large set
# costs one extra forward pass over at most this many images.
CALIBRATION_MAX = 500


@dataclass(frozen=True)
class Calibration:
    """How a threshold was set: from `images` normal scores, obtained by `scheme`, which
    can promise a false-positive rate of `min_fpr` at best."""

    images: int
    scheme: str
    min_fpr: float

    @classmethod
    def of(cls, images: int, scheme: str) -> Calibration:
        return cls(images, scheme, min_supported_fpr(images))

    def to_json(self) -> dict:
        return asdict(self)


# The scheme of a fit asked for no threshold (`Detector.fit(calibrate=False)`).
UNCALIBRATED = "not calibrated"


def min_supported_fpr(n_scores: int) -> float:
    """The smallest false-positive rate a threshold from `n_scores` normal scores can promise."""
    return 1.0 / (n_scores + 1)


def conformal_threshold(normal_scores: np.ndarray, fpr: float) -> float:
    """The threshold a new normal image exceeds with probability at most `fpr` (at most
    `min_supported_fpr(n)` when `fpr` asks for less than n scores can promise)."""
    if not 0 <= fpr < 1:
        raise ValueError(f"target false-positive rate must be in [0, 1), got {fpr}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no normal scores to set a threshold from")
    rank = math.ceil((scores.size + 1) * (1 - fpr))
    return float(scores[min(rank, scores.size) - 1])


def achieved_rates(
    labels: np.ndarray, scores: np.ndarray, threshold: float | None
) -> tuple[float | None, float | None]:
    """(false-positive rate on the normal images, recall on the anomalous ones) of the
    decision `score > threshold`; None where there is no threshold or no image of a class."""
    if threshold is None:
        return None, None
    labels, flagged = np.asarray(labels).astype(bool), np.asarray(scores) > threshold
    fpr = float(flagged[~labels].mean()) if (~labels).any() else None
    recall = float(flagged[labels].mean()) if labels.any() else None
    return fpr, recall


@dataclass(frozen=True)
class Thresholds:
    """A fit's decision and mask levels, and the normal scores they were read from."""

    threshold: float | None
    source: str
    pixel_threshold: float | None
    dense_pixel_threshold: float | None
    normal_scores: np.ndarray
    calibration: Calibration


def thresholds_from(
    normal: Sequence[tuple[float, float]],
    dense_peaks: Sequence[float],
    scheme: str,
    fpr: float,
    fixed: float | None = None,
) -> Thresholds:
    """Thresholds at `fpr` from normal images no model saw: (image score, map peak) of each,
    obtained by `scheme`, and their dense-map peaks; `fixed`: the user's image threshold.
    Masks take the pixel level that the same share of those images never reach."""
    scores = np.array([score for score, _ in normal])
    peaks = np.array([peak for _, peak in normal])
    calibration = Calibration.of(len(scores), scheme)
    if fixed is None and len(scores) and fpr < calibration.min_fpr:
        log.warning(
            "%d normal images can promise a false-positive rate of %.3g at best, not the "
            "%.3g asked for; the threshold is the highest of their scores. Give at least "
            "%d normal images for that rate.",
            len(scores),
            calibration.min_fpr,
            fpr,
            math.ceil(1 / fpr) if fpr > 0 else 0,
        )
    if fixed is not None:
        threshold, source = float(fixed), "user"
    elif len(scores):
        threshold = conformal_threshold(scores, fpr)
        source = f"fpr {fpr} on {len(scores)} normal images, {scheme}"
    else:
        threshold, source = None, "none"
    if threshold is None and scheme != UNCALIBRATED:
        log.warning(
            "no held-out normal image could be scored (one image leaves none to hold out): "
            "no decision threshold is set; pass threshold= (CLI --threshold) or give more "
            "normal images"
        )
    return Thresholds(
        threshold=threshold,
        source=source,
        pixel_threshold=conformal_threshold(peaks, fpr) if len(peaks) else None,
        dense_pixel_threshold=(
            conformal_threshold(np.array(dense_peaks), fpr) if len(dense_peaks) else None
        ),
        normal_scores=scores,
        calibration=calibration,
    )
