"""Evaluation metrics for anomaly detection (image level) and segmentation (pixel level).

Pure numpy + scipy, so evaluation needs no scikit-learn. Image-level metrics follow the
scikit-learn definitions exactly, ties included. Pixel-level metrics pool every pixel of every
image (tens of millions on MVTec AD), so they keep one float32 copy of the scores, sort it once
in place and walk it in chunks instead of materialising float64 arrays per pixel.
"""

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

__all__ = [
    "aupro",
    "average_precision",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "roc_curve",
]

# Queries handled per np.searchsorted call, to bound the temporaries on huge pixel sets.
_CHUNK = 1 << 20
# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _checked_labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs; return bool labels and float64 scores."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.size != s.size:
        raise ValueError(f"labels has {y.size} entries but scores has {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 or bool")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("labels contain only one class; need both normal (0) and anomalous (1)")
    return y, s


def _threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive counts when thresholding at each distinct score, highest first.

    Predicting "anomalous" for score >= t; tied scores cross the threshold together.
    """
    order = np.argsort(s, kind="stable")[::-1]
    s_desc = s[order]
    last_of_run = np.r_[np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1]
    tps = np.cumsum(y[order])[last_of_run]
    fps = last_of_run + 1 - tps
    return fps, tps, s_desc[last_of_run]


def _half_ranks_below(sorted_ref: np.ndarray, queries: np.ndarray) -> float:
    """Sum over queries q of #(ref < q) + #(ref == q) / 2, with ref sorted ascending."""
    twice = 0
    for start in range(0, queries.size, _CHUNK):
        q = queries[start : start + _CHUNK]
        twice += int(np.searchsorted(sorted_ref, q, "left").sum())
        twice += int(np.searchsorted(sorted_ref, q, "right").sum())
    return twice / 2


def _mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos score > neg score) + P(equal) / 2, the ROC AUC with ties as scikit-learn counts them.

    Sorts the larger of the two arrays in place (callers pass their own copies) and binary-searches
    the smaller one into it, so no per-pixel rank array is ever built.
    """
    pairs = pos.size * neg.size
    if pos.size <= neg.size:
        neg.sort()
        wins = _half_ranks_below(neg, pos)
    else:
        pos.sort()
        wins = pairs - _half_ranks_below(pos, neg)
    return wins / pairs


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores (labels 1 = anomalous), ties averaged.

    Computed as the Mann-Whitney statistic, which equals scikit-learn's roc_auc_score.
    """
    y, s = _checked_labels_scores(labels, scores)
    return _mann_whitney_auc(s[y], s[~y])


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision, sum_n (R_n - R_{n-1}) * P_n over distinct thresholds.

    Same (non-interpolated) definition as scikit-learn's average_precision_score.
    """
    y, s = _checked_labels_scores(labels, scores)
    fps, tps, _ = _threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Best F1 score over all thresholds: how well the best possible cut separates the classes."""
    y, s = _checked_labels_scores(labels, scores)
    fps, tps, _ = _threshold_counts(y, s)
    # F1 = 2 TP / (2 TP + FP + FN) and TP + FN is the number of positives.
    return float(np.max(2 * tps / (tps + fps + tps[-1])))


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr, thresholds) with one point per distinct score, for plotting.

    Starts at (0, 0) with threshold +inf; point i classifies score >= thresholds[i] as anomalous.
    Matches scikit-learn's roc_curve(..., drop_intermediate=False).
    """
    y, s = _checked_labels_scores(labels, scores)
    fps, tps, thresholds = _threshold_counts(y, s)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def _checked_pairs(
    masks: Sequence[ArrayLike], maps: Sequence[ArrayLike]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate per-image (mask, map) pairs; masks become bool (nonzero = anomalous)."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    if len(masks) == 0:
        raise ValueError("no images given")
    pairs = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask = np.asarray(mask)
        amap = np.asarray(amap)
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(
                f"image {i}: mask shape {mask.shape} and map shape {amap.shape} "
                "must be equal and 2-D"
            )
        if np.isnan(amap).any():
            raise ValueError(f"image {i}: anomaly map contains NaN")
        pairs.append((mask if mask.dtype == bool else mask != 0, amap))
    return pairs


def _split_pixels(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Pool the map values of all images into float32 (normal, anomalous) arrays.

    Anomalous values are in image order, then row-major order within each image.
    """
    n_anomalous = sum(int(np.count_nonzero(mask)) for mask, _ in pairs)
    n_total = sum(mask.size for mask, _ in pairs)
    normal = np.empty(n_total - n_anomalous, dtype=np.float32)
    anomalous = np.empty(n_anomalous, dtype=np.float32)
    i_normal = i_anomalous = 0
    for mask, amap in pairs:
        values = amap[~mask]
        normal[i_normal : i_normal + values.size] = values
        i_normal += values.size
        values = amap[mask]
        anomalous[i_anomalous : i_anomalous + values.size] = values
        i_anomalous += values.size
    return normal, anomalous


def pixel_auroc(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike]) -> float:
    """ROC AUC over all pixels of all images pooled (mask nonzero = anomalous pixel).

    masks and maps hold one 2-D array per image; shapes may differ between images. Scores are
    compared in float32.
    """
    normal, anomalous = _split_pixels(_checked_pairs(masks, maps))
    if normal.size == 0 or anomalous.size == 0:
        raise ValueError("pixel AUROC needs both normal and anomalous pixels")
    return _mann_whitney_auc(anomalous, normal)


def aupro(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike], fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to fpr_limit (MVTec AD AUPRO).

    Regions are the 8-connected components of each mask. At threshold t, PRO(t) is the mean over
    all regions of all images of the fraction of the region scoring >= t, and FPR(t) is the
    fraction of all normal pixels (every image) scoring >= t. The PRO-vs-FPR curve over every
    distinct score is integrated exactly with the trapezoid rule from 0 to fpr_limit (interpolated
    at fpr_limit) and divided by fpr_limit, so a perfect map scores 1. No threshold grid is
    sampled. Scores are compared in float32.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    pairs = _checked_pairs(masks, maps)
    weights = []
    n_regions = 0
    for mask, _ in pairs:
        labelled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        ids = labelled[mask]
        weights.append(1.0 / np.bincount(ids)[ids])
        n_regions += n
    if n_regions == 0:
        raise ValueError("masks contain no anomalous regions")
    normal, anomalous = _split_pixels(pairs)
    if normal.size == 0:
        raise ValueError("masks contain no normal pixels")

    # Every anomalous pixel carries PRO weight 1 / (|region| * n_regions); within_top[k] is the
    # PRO of the k highest-scoring anomalous pixels.
    order = np.argsort(anomalous, kind="stable")
    anomalous = anomalous[order]
    pro_weight = np.concatenate(weights)[order] / n_regions
    within_top = np.r_[0.0, np.cumsum(pro_weight[::-1])]

    def pro_at_least(t: np.ndarray) -> np.ndarray:
        return within_top[anomalous.size - np.searchsorted(anomalous, t, "left")]

    def pro_above(t: np.ndarray) -> np.ndarray:
        return within_top[anomalous.size - np.searchsorted(anomalous, t, "right")]

    # Walking thresholds downwards, the normal pixels scoring v (c of them) move the curve from
    # (F, PRO(> v)) to (F + c / n, PRO(>= v)); steps where only anomalous pixels cross are
    # vertical and add no area. So each normal pixel at value v contributes a slice of width 1/n
    # and mean height (PRO(> v) + PRO(>= v)) / 2, and only the group of tied normal pixels that
    # straddles fpr_limit needs clipping.
    n = normal.size
    normal.sort()
    # The tied group [lo, hi) holding the normal pixel whose slice contains fpr_limit.
    crossing = normal[n - min(int(np.ceil(fpr_limit * n)), n)]
    lo, hi = np.searchsorted(normal, crossing, "left"), np.searchsorted(normal, crossing, "right")
    twice_area = 0.0
    for start in range(hi, n, _CHUNK):
        t = normal[start : start + _CHUNK]
        twice_area += float(np.sum(pro_above(t)) + np.sum(pro_at_least(t)))
    area = twice_area / (2 * n)

    x0, x1 = (n - hi) / n, (n - lo) / n
    y0, y1 = float(pro_above(crossing)), float(pro_at_least(crossing))
    x_end = min(fpr_limit, x1)
    y_end = y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
    area += max(x_end - x0, 0.0) * (y0 + y_end) / 2
    return area / fpr_limit
