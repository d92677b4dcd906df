"""Zero-shot cost: feature extraction vs mutual scoring, for a batch of N images.

Takes N test images spread over the category, times the backbone alone over all of them, then
the whole `Detector.zero_shot` on the same decoded images (features again, all neighbourhood
sizes, maps, image scores, re-scoring); the difference is the cost beyond feature extraction.

    python benchmarks/zero_shot.py --images 200 --image-size 224
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from normalcy import Detector
from normalcy.backbones import PRECISIONS, create_backbone
from normalcy.data import load_image
from normalcy.datasets import find_categories
from normalcy.evaluate import peak_rss_mb

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one MVTec category")
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=200, help="batch size to score")
    args = parser.parse_args()
    tests = find_categories(args.data)[0].test
    picks = np.linspace(0, len(tests) - 1, min(args.images, len(tests))).round().astype(int)
    images = [load_image(tests[i].path) for i in picks]
    detector = Detector(
        backbone=args.backbone,
        method="mutual",
        image_size=args.image_size,
        precision=args.precision,
    )
    backbone = create_backbone(args.backbone, args.image_size, precision=args.precision)
    start = time.perf_counter()
    for image in images:
        backbone.features([image])
    feature_seconds = time.perf_counter() - start
    start = time.perf_counter()
    detector.zero_shot(images)
    total_seconds = time.perf_counter() - start
    patches = sum(
        np.prod(backbone.input_size(*image.shape[:2])) // backbone.stride**2 for image in images
    )
    print(
        "| images | precision | image size | patches | features ms/img | beyond features ms/img | "
        "peak RSS MB |\n|---|---|---|---|---|---|---|"
    )
    print(
        f"| {len(images)} | {backbone.precision} | {args.image_size} | {patches} | "
        f"{1000 * feature_seconds / len(images):.0f} | "
        f"{1000 * (total_seconds - feature_seconds) / len(images):.0f} | {peak_rss_mb():.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
