"""Tests for golden templates: position-restricted search and paired inspection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_OPTIONS, assert_close
from PIL import Image

from normalcy import Detector
from normalcy.cli import main
from normalcy.methods import METHODS, method_from_state
from normalcy.methods.golden import GoldenTemplate


def _brute_force(references: np.ndarray, grid: np.ndarray, radius: int) -> np.ndarray:
    """Nearest reference patch within `radius` cells of each position, by loops."""
    height, width = grid.shape[:2]
    out = np.full((height, width), np.inf)
    for y in range(height):
        for x in range(width):
            for ref in references:
                for yy in range(max(0, y - radius), min(height, y + radius + 1)):
                    for xx in range(max(0, x - radius), min(width, x + radius + 1)):
                        distance = np.sqrt(((ref[yy, xx] - grid[y, x]) ** 2).sum())
                        out[y, x] = min(out[y, x], distance)
    return out


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_position_restricted_search_equals_brute_force_within_the_radius(radius: int) -> None:
    rng = np.random.default_rng(radius)
    references = rng.standard_normal((3, 7, 9, 5)).astype(np.float32)
    grid = rng.standard_normal((7, 9, 5)).astype(np.float32)
    method = GoldenTemplate(radius=radius).fit(list(references))
    scores = method.score_grid(torch.from_numpy(grid)).patches.numpy()
    assert_close(scores, _brute_force(references, grid, radius))


def test_a_patch_found_elsewhere_in_the_reference_still_counts_as_misplaced() -> None:
    reference = np.zeros((6, 6, 2), dtype=np.float32)
    reference[0, 0] = [5, 5]  # a feature that belongs in the corner
    moved = np.zeros_like(reference)
    moved[4, 4] = [5, 5]  # the same feature, in the wrong place
    method = GoldenTemplate(radius=1).fit([reference])
    scores = method.score_grid(torch.from_numpy(moved)).patches.numpy()
    assert scores[4, 4] == pytest.approx(np.sqrt(50))  # any-position kNN would give 0
    assert scores[0, 0] == 0 and scores[1, 1] == 0


def test_references_of_other_sizes_and_misfit_images_are_refused() -> None:
    with pytest.raises(ValueError, match="aligned references of one size"):
        GoldenTemplate().fit([np.zeros((4, 4, 2)), np.zeros((4, 5, 2))])
    method = GoldenTemplate().fit([np.zeros((4, 4, 2))])
    with pytest.raises(ValueError, match="does not match the references'"):
        method.score_grid(torch.zeros(5, 4, 2))
    with pytest.raises(ValueError, match="radius"):
        GoldenTemplate(radius=-1)
    with pytest.raises(ValueError, match="without --shots"):
        Detector(method="golden", shots=2)
    with pytest.raises(ValueError, match="no dense map"):
        Detector(method="golden", dense_map=True)
    with pytest.raises(ValueError, match="radius must be from 0 to 8"):
        GoldenTemplate(radius=100_000)


def test_left_out_references_are_scored_against_the_others_and_state_round_trips() -> None:
    rng = np.random.default_rng(0)
    references = list(rng.standard_normal((3, 4, 4, 2)).astype(np.float32))
    method = GoldenTemplate(radius=1).fit(references)
    (left_out,) = method.score_left_out([torch.from_numpy(references[1])], [1])
    others = GoldenTemplate(radius=1).fit([references[0], references[2]])
    expected = others.score_grid(torch.from_numpy(references[1])).patches
    torch.testing.assert_close(left_out.patches, expected)
    assert "golden" in METHODS
    loaded = method_from_state("golden", method.get_params(), method.arrays())
    torch.testing.assert_close(
        loaded.score_grid(torch.from_numpy(references[0])).patches,
        method.score_grid(torch.from_numpy(references[0])).patches,
    )


def _board(defect: bool = False) -> np.ndarray:
    image = np.full((96, 96, 3), 30, dtype=np.uint8)
    image[:, 10::16] = image[10::16, :] = 210
    if defect:
        image[40:48, 40:48] = 210  # a short between two traces
    return image


def test_paired_mode_finds_a_planted_difference_between_otherwise_identical_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, same, different = (tmp_path / f"{n}.png" for n in ("ref", "same", "diff"))
    Image.fromarray(_board()).save(reference)
    Image.fromarray(_board()).save(same)
    Image.fromarray(_board(defect=True)).save(different)
    out = tmp_path / "out"
    argv = ["predict", "--reference", str(reference), str(same), str(different), "-o", str(out)]
    assert main([*argv, "--threshold", "0.05", *FAST_OPTIONS]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert rows[0]["score"] == pytest.approx(0.0, abs=1e-3)  # identical to its twin
    assert rows[1]["score"] > 0.1 and rows[1]["is_anomalous"] is True
    assert rows[0]["is_anomalous"] is False
    assert "reference" in json.loads((out / "results.json").read_text())["model"]


def test_a_golden_model_fitted_on_aligned_references_calibrates_saves_and_flags(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)

    def noisy(defect: bool = False) -> np.ndarray:
        noise = rng.normal(0, 3, (96, 96, 3))
        return np.clip(_board(defect) + noise, 0, 255).astype(np.uint8)

    detector = Detector(method="golden", backbone="efficientnet_lite0", image_size=64)
    detector.fit([noisy() for _ in range(12)])
    assert detector.calibration_.images == 12
    assert "without its own patches" in detector.threshold_source_
    loaded = Detector.load(detector.save(tmp_path / "golden"))
    assert loaded.setting.method == "golden"
    good, bad = loaded.predict([noisy(), noisy(defect=True)])
    assert bad.score > loaded.threshold_ >= good.score
    assert bad.is_anomalous and not good.is_anomalous
