"""The per-defect-type breakdown of an evaluation."""

import numpy as np
import pytest

from normalcy.evaluate import by_defect, format_defect_table
from normalcy.metrics import aupro, image_auroc


def _masks_and_maps(n: int, hit: list[bool]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n 8x8 images; image i has a 2x2 defect when hit is given for it, and its map is hot
    there when hit[i] is True (a found defect) or elsewhere when False (a missed one)."""
    masks, maps = [], []
    for i in range(n):
        mask, amap = np.zeros((8, 8), bool), np.full((8, 8), 0.1 * i / n)
        if hit[i] is not None:
            mask[2:4, 2:4] = True
            amap[2:4, 2:4] = 1.0 if hit[i] else 0.0
            if not hit[i]:
                amap[5:7, 5:7] = 1.0
        masks.append(mask)
        maps.append(amap)
    return masks, maps


def test_each_defect_type_is_ranked_against_the_good_images_alone() -> None:
    defects = ["good", "good", "good", "crack", "crack", "stain", "stain"]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.15, 0.25]  # cracks are found, stains are not
    rows = {r.defect: r for r in by_defect(defects, scores)}
    assert set(rows) == {"crack", "stain"}
    assert rows["crack"].image_auroc == 1.0 and rows["crack"].n_images == 2
    assert rows["stain"].image_auroc == pytest.approx(
        image_auroc([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.15, 0.25])
    )
    assert rows["crack"].aupro is None  # no masks given


def test_aupro_of_a_defect_type_uses_its_images_and_the_good_ones() -> None:
    defects = ["good", "good", "crack", "crack", "stain", "stain"]
    hit = [None, None, True, True, False, False]
    masks, maps = _masks_and_maps(len(defects), hit)
    rows = {r.defect: r for r in by_defect(defects, [0.0, 0.1, 1, 1, 1, 1], masks, maps)}
    assert rows["crack"].aupro == pytest.approx(aupro(masks[:4], maps[:4]))
    assert rows["crack"].aupro > 0.9 > 0.1 > rows["stain"].aupro


def test_no_breakdown_without_good_images_or_with_one_defect_type() -> None:
    assert by_defect(["crack", "stain"], [0.5, 0.6]) == []
    assert by_defect(["good", "crack"], [0.1, 0.6]) == []


def test_defect_table_lists_every_type_of_every_result() -> None:
    summary = {
        "results": [
            {
                "category": "tile",
                "method": "patchknn",
                "backbone": "b",
                "shots": None,
                "draw": None,
                "by_defect": [
                    {"defect": "crack", "n_images": 2, "image_auroc": 1.0, "aupro": 0.5},
                    {"defect": "uneven", "n_images": 3, "image_auroc": 0.75, "aupro": None},
                ],
            }
        ]
    }
    table = format_defect_table(summary)
    assert "tile patchknn" in table
    assert "crack" in table and "0.500" in table and "uneven" in table and "0.750" in table
    assert format_defect_table({"results": [{"by_defect": []}]}) == ""
