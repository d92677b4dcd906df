"""Does a backbone ensemble help? DINOv2-S and EfficientNet-Lite0 maps, each normalised by its
held-out normal pixels (z-score or quantile), averaged, compared with each backbone alone.

    python benchmarks/ensemble.py          # about 15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from normalcy import Detector
from normalcy.data import find_categories, load_mask
from normalcy.metrics import aupro, image_auroc, pixel_auroc
from normalcy.postprocess import image_score

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"
BACKBONES = ("dinov2_vits14", "efficientnet_lite0")


def zscore(normal: list[np.ndarray], maps: list[np.ndarray]) -> list[np.ndarray]:
    values = np.concatenate([m.ravel() for m in normal])
    return [(m - values.mean()) / values.std() for m in maps]


def quantile(normal: list[np.ndarray], maps: list[np.ndarray]) -> list[np.ndarray]:
    values = np.sort(np.concatenate([m.ravel() for m in normal]))
    spread = values[-1] - values[0]
    # Above the largest normal value, keep ordering by extending linearly.
    return [
        np.searchsorted(values, m) / len(values) + np.maximum(0, m - values[-1]) / spread
        for m in maps
    ]


def report(name: str, labels, masks, maps) -> None:
    scores = [image_score(m) for m in maps]
    print(
        f"| {name} | {image_auroc(labels, scores):.3f} | {pixel_auroc(masks, maps):.3f} | "
        f"{aupro(masks, maps):.3f} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one MVTec category")
    args = parser.parse_args()
    category = find_categories(args.data)[0]
    held_out = category.train[9::10]  # the images Detector.fit holds out of the bank
    labels = [s.label for s in category.test]
    maps: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    print("| maps | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for backbone in BACKBONES:
        detector = Detector(backbone=backbone).fit(category.train)
        normal = [p.anomaly_map for p in detector.predict(held_out)]
        test = [p.anomaly_map for p in detector.predict([s.path for s in category.test])]
        maps[backbone] = (normal, test)
    masks = [
        load_mask(s.mask_path, m.shape) if s.mask_path else np.zeros(m.shape, bool)
        for s, m in zip(category.test, maps[BACKBONES[0]][1], strict=True)
    ]
    for backbone in BACKBONES:
        report(backbone, labels, masks, maps[backbone][1])
    for name, normalise in (("z-score", zscore), ("quantile", quantile)):
        parts = [normalise(*maps[b]) for b in BACKBONES]
        fused = [sum(group) / len(group) for group in zip(*parts, strict=True)]
        report(f"ensemble, {name}", labels, masks, fused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
