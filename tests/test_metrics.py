import itertools

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from normalcy.metrics import (
    aupro,
    average_precision,
    f1_max,
    image_auroc,
    pixel_auroc,
    roc_curve,
)


def _tied_labels_scores(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Random binary labels and scores on a coarse grid, so many scores tie across classes."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    scores = np.round(rng.normal(size=n) + labels, 1)
    return labels, scores


def _random_masks_maps(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Small images of different shapes, sparse masks (many regions), maps with ties, one normal."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for shape in [(7, 9), (6, 6), (8, 5), (5, 7)]:
        mask = rng.random(shape) < 0.2
        amap = (rng.integers(0, 12, size=shape) + 4 * mask) / 12
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    masks[2][:] = False
    return masks, maps


def _aupro_brute_force(masks, maps, fpr_limit: float) -> float:
    """Slow reference: PRO and FPR recomputed from scratch at every distinct score."""
    regions, normals = [], []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == r] for r in range(1, n + 1)]
        normals.append(amap[~mask])
    normal = np.concatenate(normals)
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    curve = [(0.0, 0.0)]
    for t in thresholds:
        fpr = np.mean(normal >= t)
        pro = np.mean([np.mean(region >= t) for region in regions])
        curve.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_with_ties(seed):
    labels, scores = _tied_labels_scores(seed)
    assert image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_with_ties(seed):
    labels, scores = _tied_labels_scores(seed)
    expected = skm.average_precision_score(labels, scores)
    assert average_precision(labels, scores) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_matches_sklearn_with_ties(seed):
    labels, scores = _tied_labels_scores(seed)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thresholds, sk_thresholds)  # both are the input scores
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force_over_thresholds(seed):
    labels, scores = _tied_labels_scores(seed, n=60)
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        if tp:
            precision, recall = tp / predicted.sum(), tp / labels.sum()
            best = max(best, 2 * precision * recall / (precision + recall))
    assert f1_max(labels, scores) == pytest.approx(best)


def test_image_metrics_accept_int_lists():
    labels, scores = [0, 1, 0, 1], [0.1, 0.8, 0.3, 0.3]
    assert image_auroc(labels, scores) == pytest.approx(0.875)
    # Thresholds .8, .3, .1 give (recall, precision) (.5, 1), (1, 2/3), (1, .5).
    assert average_precision(labels, scores) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert f1_max(labels, scores) == pytest.approx(0.8)


def test_image_auroc_of_separated_scores_is_one():
    assert image_auroc([False, False, True], [0.0, 0.2, 0.5]) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_on_flattened_pixels(seed):
    masks, maps = _random_masks_maps(seed)
    expected = skm.roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected)


def test_pixel_auroc_with_more_anomalous_than_normal_pixels_matches_sklearn():
    masks, maps = _random_masks_maps(0)
    masks = [~m for m in masks]
    expected = skm.roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected)


def test_pixel_metrics_leave_inputs_unchanged():
    masks, maps = _random_masks_maps(1)
    copies = [m.copy() for m in maps]
    pixel_auroc(masks, maps)
    aupro(masks, maps)
    for amap, copy in zip(maps, copies, strict=True):
        np.testing.assert_array_equal(amap, copy)  # untouched memory


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_of_a_perfect_map_is_one(fpr_limit):
    masks, _ = _random_masks_maps(3)
    maps = [m.astype(np.float32) for m in masks]
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(1.0)


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """One 5x5 image: region A is pixel (0, 0); region B is 4 pixels joined only diagonally
    in part, so it is one region under 8-connectivity (three under 4-connectivity)."""
    mask = np.zeros((5, 5), dtype=bool)
    amap = np.zeros((5, 5), dtype=np.float32)
    mask[0, 0] = True
    amap[0, 0] = 0.9
    for (r, c), score in {(2, 2): 0.8, (3, 3): 0.8, (4, 4): 0.4, (4, 3): 0.3}.items():
        mask[r, c] = True
        amap[r, c] = score
    # 20 normal pixels: 2 score 0.6, 4 score 0.3 (tied with a pixel of B), 14 score 0.
    normal = np.flatnonzero(~mask.ravel())
    amap.ravel()[normal[:2]] = 0.6
    amap.ravel()[normal[2:6]] = 0.3
    return mask, amap


@pytest.mark.parametrize(
    "fpr_limit, expected",
    [
        # Curve (FPR, PRO): (0,0) (0,.5) (0,.75) (.1,.75) (.1,.875) (.3,1) (1,1).
        # Up to .3: .1 * .75 + .2 * (.875 + 1) / 2 = .2625.
        (0.3, 0.2625 / 0.3),
        # Up to .2, PRO interpolated to .9375: .1 * .75 + .1 * (.875 + .9375) / 2 = .165625.
        (0.2, 0.165625 / 0.2),
        # Inside the flat first segment.
        (0.05, 0.75),
        # Whole curve: .2625 + .7 * 1.
        (1.0, 0.9625),
    ],
)
def test_aupro_matches_hand_computed_curve(fpr_limit, expected):
    mask, amap = _hand_case()
    assert aupro([mask], [amap], fpr_limit=fpr_limit) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.07, 1.0])
def test_aupro_matches_brute_force_reference(seed, fpr_limit):
    masks, maps = _random_masks_maps(seed)
    expected = _aupro_brute_force(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, rel=1e-9)


def test_aupro_counts_normal_images_in_fpr():
    mask, amap = _hand_case()
    # 20 more normal pixels, all above every anomalous score: FPR reaches .5 before any PRO.
    high = np.full((4, 5), 2.0, dtype=np.float32)
    assert aupro([mask, np.zeros((4, 5))], [amap, high], fpr_limit=0.5) == 0.0


def test_aupro_accepts_uint8_masks_stacked_as_arrays():
    mask, amap = _hand_case()
    masks = np.stack([mask.astype(np.uint8) * 255] * 2)
    maps = np.stack([amap, amap])
    assert aupro(masks, maps) == pytest.approx(0.2625 / 0.3)


@pytest.mark.parametrize("func", [image_auroc, average_precision, f1_max, roc_curve])
def test_image_metrics_reject_single_class_labels(func):
    with pytest.raises(ValueError, match="one class"):
        func([1, 1, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("func", [image_auroc, average_precision, f1_max, roc_curve])
def test_image_metrics_reject_length_mismatch(func):
    with pytest.raises(ValueError, match="3 entries but scores has 2"):
        func([0, 1, 1], [0.1, 0.2])


@pytest.mark.parametrize("func", [image_auroc, average_precision, f1_max, roc_curve])
def test_image_metrics_reject_nan_scores(func):
    with pytest.raises(ValueError, match="NaN"):
        func([0, 1, 1], [0.1, np.nan, 0.3])


def test_image_metrics_reject_non_binary_labels():
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("func", [pixel_auroc, aupro])
def test_pixel_metrics_name_the_image_with_mismatched_shapes(func):
    masks, maps = _random_masks_maps(0)
    maps[1] = maps[1][:, :-1]
    with pytest.raises(ValueError, match="image 1"):
        func(masks, maps)


@pytest.mark.parametrize("func", [pixel_auroc, aupro])
def test_pixel_metrics_reject_different_numbers_of_masks_and_maps(func):
    masks, maps = _random_masks_maps(0)
    with pytest.raises(ValueError, match="4 masks but 3"):
        func(masks, maps[:3])


@pytest.mark.parametrize("func", [pixel_auroc, aupro])
def test_pixel_metrics_name_the_image_with_nan(func):
    masks, maps = _random_masks_maps(0)
    maps[3][0, 0] = np.nan
    with pytest.raises(ValueError, match="image 3.*NaN"):
        func(masks, maps)


def test_aupro_rejects_masks_without_regions():
    with pytest.raises(ValueError, match="no anomalous regions"):
        aupro([np.zeros((3, 3), dtype=bool)], [np.zeros((3, 3))])


def test_aupro_rejects_masks_without_normal_pixels():
    with pytest.raises(ValueError, match="no normal pixels"):
        aupro([np.ones((3, 3), dtype=bool)], [np.zeros((3, 3))])


@pytest.mark.parametrize("fpr_limit", [0.0, 1.5])
def test_aupro_rejects_fpr_limit_outside_unit_interval(fpr_limit):
    mask, amap = _hand_case()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([mask], [amap], fpr_limit=fpr_limit)


def test_pixel_auroc_rejects_masks_of_one_class():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc([np.zeros((3, 3), dtype=bool)], [np.zeros((3, 3))])
