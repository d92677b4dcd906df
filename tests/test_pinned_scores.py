"""Scores pinned: a small model fitted on generated data scores as when these numbers were
recorded (within float32's tolerance, `conftest.assert_close`), so a refactoring that changes
any arithmetic shows here first.

Recorded with efficientnet_lite0 at 64 px in float32 on the CPU. A deliberate change of the
numerics (a new default, a better map) updates these numbers in the same commit, saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_close

from normalcy import Detector
from normalcy.synthetic import make_demo_dataset

PINNED = {
    "patchknn": {
        "threshold": 0.6384337,
        "pixel_threshold": 0.6532926,
        "scores": [0.4999933, 0.4725532, 1.015981, 0.9470084],
        "map_sums": [1808.433, 1635.432, 2774.007, 1952.915],
    },
    "patchknn-2shot": {
        "threshold": 0.4930923,
        "pixel_threshold": 0.5116942,
        "scores": [0.46626, 0.4352032, 0.9888808, 0.963632],
        "map_sums": [1546.913, 1387.503, 2591.11, 1725.726],
    },
    "gaussian": {
        "threshold": 11.34829,
        "pixel_threshold": 27.47956,
        "scores": [17.68416, 9.427226, 33.90727, 18.44367],
        "map_sums": [108390.6, 86206.56, 281046.1, 139766.7],
    },
    "patchknn+gaussian": {
        "threshold": 0.4488071,
        "pixel_threshold": 2.062388,
        "scores": [0.4936961, 0.4685781, 1.015981, 0.9470084],
        "map_sums": [6873.273, 932.8921, 50832.97, 14886.5],
    },
    "mutual": {
        "scores": [
            0.2490188,
            0.2535937,
            0.545182,
            0.5094011,
            0.2763173,
            0.2748603,
            0.2727571,
            0.2434733,
        ],
    },
}
SETTINGS = {
    "patchknn": {},
    "patchknn-2shot": {"shots": 2},
    "gaussian": {"method": "gaussian"},
    "patchknn+gaussian": {"method": "patchknn+gaussian"},
}
FLOAT32_CPU = {
    "backbone": "efficientnet_lite0",
    "image_size": 64,
    "precision": "float32",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = make_demo_dataset(
        tmp_path_factory.mktemp("pinned"), n_train=12, n_test_good=2, n_test_defect=2, size=64
    )
    test = sorted((root / "test").rglob("*.png"))
    assert len(test) == 4
    return root / "train" / "good", test


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_fitted_model_scores_as_recorded(setting: str, generated) -> None:
    train, test = generated
    detector = Detector(**FLOAT32_CPU, **SETTINGS[setting]).fit(train)
    predictions = detector.predict(test)
    pinned = PINNED[setting]
    assert_close(detector.threshold_, pinned["threshold"])
    assert_close(detector.pixel_threshold_, pinned["pixel_threshold"])
    assert_close([p.score for p in predictions], pinned["scores"])
    assert_close([float(p.anomaly_map.sum()) for p in predictions], pinned["map_sums"])


def test_zero_shot_scores_as_recorded(generated) -> None:
    train, test = generated
    peers = test + sorted(train.glob("*.png"))[:4]
    results = Detector(**FLOAT32_CPU, method="mutual").zero_shot(peers)
    assert_close([p.score for p in results], PINNED["mutual"]["scores"])
