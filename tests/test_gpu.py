"""The CUDA path: the same detector on the GPU scores like on the CPU. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from normalcy import Detector
from normalcy.inputs import list_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
OPTIONS = {"backbone": "efficientnet_lite0", "image_size": 64}


def _split(dataset: Path) -> tuple[list[Path], list[Path]]:
    """Normal training images, and test images: good first, then defective."""
    test = list_images(dataset / "test" / "good") + [
        p for p in list_images(dataset / "test") if p.parent.name != "good"
    ]
    return list_images(dataset / "train" / "good"), test


@pytest.mark.parametrize("method", ["patchknn", "gaussian", "patchknn+gaussian"])
def test_a_model_fitted_on_the_cpu_scores_the_same_on_the_gpu(
    dataset: Path, method: str, tmp_path: Path
) -> None:
    train, test = _split(dataset)
    cpu = Detector(**OPTIONS, method=method, device="cpu", precision="float32").fit(train)
    gpu = Detector.load(cpu.save(tmp_path / "model"), device="cuda")
    assert gpu.backbone_.device.type == "cuda"
    expected = [p.score for p in cpu.predict(test)]
    found = gpu.predict(test)
    # cuDNN runs float32 convolutions in TF32 by default: close, not bit-equal.
    np.testing.assert_allclose([p.score for p in found], expected, rtol=2e-2)
    assert [p.is_anomalous for p in found] == [p.is_anomalous for p in cpu.predict(test)]
    assert found[0].anomaly_map.shape == found[0].image_size


def test_fitting_on_the_gpu_gives_the_decisions_of_the_cpu(dataset: Path) -> None:
    train, test = _split(dataset)
    cpu = Detector(**OPTIONS, device="cpu", precision="float32").fit(train)
    gpu = Detector(**OPTIONS, device="cuda", precision="float32").fit(train)
    assert gpu.threshold_ == pytest.approx(cpu.threshold_, rel=2e-2)
    assert [p.is_anomalous for p in gpu.predict(test)] == [
        p.is_anomalous for p in cpu.predict(test)
    ]


def test_zero_shot_ranks_defects_first_on_the_gpu(dataset: Path) -> None:
    train, test = _split(dataset)
    results = Detector(**OPTIONS, method="mutual", device="cuda").zero_shot(train + test)
    scores = np.array([r.score for r in results])
    defective = len(train) + len(list_images(dataset / "test" / "good"))
    assert np.median(scores[defective:]) > np.median(scores[:defective])
