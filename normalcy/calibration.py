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

import math
from dataclasses import asdict, dataclass

import numpy as np

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
