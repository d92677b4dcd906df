"""Does fusing two settings help? Two detectors (two backbones, or two methods on one backbone)
score the same images; each one's maps and image scores are normalised by its held-out normal
images (z-score or quantile) and averaged, and the result is compared with each alone.

    python benchmarks/fusion.py --fuse backbones   # DINOv2-S + EfficientNet-Lite0 patch kNN
    python benchmarks/fusion.py --fuse methods     # patch kNN + Gaussian on DINOv2-S
                                                   # each about 15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from normalcy import Detector
from normalcy.datasets import find_categories, load_mask
from normalcy.metrics import aupro, image_auroc, pixel_auroc

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"
PAIRS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "backbones": (
        ("dinov2_vits14 patchknn", {"backbone": "dinov2_vits14"}),
        ("efficientnet_lite0 patchknn", {"backbone": "efficientnet_lite0"}),
    ),
    "methods": (
        ("dinov2_vits14 patchknn", {"method": "patchknn"}),
        ("dinov2_vits14 gaussian", {"method": "gaussian"}),
    ),
}


def zscore(normal: np.ndarray, values: np.ndarray) -> np.ndarray:
    return (values - normal.mean()) / normal.std()


def quantile(normal: np.ndarray, values: np.ndarray) -> np.ndarray:
    ordered = np.sort(normal.ravel())
    spread = ordered[-1] - ordered[0]
    # Above the largest normal value, keep ordering by extending linearly.
    return (
        np.searchsorted(ordered, values) / ordered.size
        + np.maximum(0, values - ordered[-1]) / spread
    )


class Scored:
    """One detector's image scores and maps on held-out normal and on test images."""

    def __init__(self, detector: Detector, held_out: list, test: list) -> None:
        normal = detector.predict(held_out)
        predictions = detector.predict(test)
        self.normal_scores = np.array([p.score for p in normal])
        self.normal_pixels = np.concatenate([p.anomaly_map.ravel() for p in normal])
        self.scores = np.array([p.score for p in predictions])
        self.maps = [p.anomaly_map for p in predictions]

    def normalised(self, normalise) -> tuple[np.ndarray, list[np.ndarray]]:
        scores = normalise(self.normal_scores, self.scores)
        return scores, [normalise(self.normal_pixels, m) for m in self.maps]


def report(name: str, labels, masks, scores, maps) -> None:
    print(
        f"| {name} | {image_auroc(labels, scores):.3f} | {pixel_auroc(masks, maps):.3f} | "
        f"{aupro(masks, maps):.3f} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one MVTec category")
    parser.add_argument("--fuse", choices=sorted(PAIRS), default="methods")
    args = parser.parse_args()
    category = find_categories(args.data)[0]
    held_out = category.train[9::10]  # the images Detector.fit holds out of the model
    test = [s.path for s in category.test]
    labels = [s.label for s in category.test]
    results = {
        name: Scored(Detector(**options).fit(category.train), held_out, test)
        for name, options in PAIRS[args.fuse]
    }
    first = next(iter(results.values()))
    masks = [
        load_mask(s.mask_path, m.shape) if s.mask_path else np.zeros(m.shape, bool)
        for s, m in zip(category.test, first.maps, strict=True)
    ]
    print("| maps | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for name, scored in results.items():
        report(name, labels, masks, scored.scores, scored.maps)
    for label, normalise in (("z-score", zscore), ("quantile", quantile)):
        parts = [scored.normalised(normalise) for scored in results.values()]
        scores = sum(p[0] for p in parts) / len(parts)
        maps = [sum(group) / len(group) for group in zip(*(p[1] for p in parts), strict=True)]
        report(f"fused, {label}", labels, masks, scores, maps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
