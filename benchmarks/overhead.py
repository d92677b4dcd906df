"""How much of predict time is the backbone, and how much is normalcy's own work.

Fits a detector (the default bank size is reached with about a hundred images), then times,
image by image, the backbone alone (preprocess + forward + feature aggregation) and the whole
predict (the same plus nearest-neighbour search, map upsampling, smoothing, scoring).

    python benchmarks/overhead.py --image-size 448
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from normalcy import Detector
from normalcy.backbones import PRECISIONS
from normalcy.data import LoadedImage, find_categories, load_image

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one MVTec category")
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--dense-map", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--train", type=int, default=100, help="normal images to fit on")
    parser.add_argument("--test", type=int, default=20, help="images to time")
    args = parser.parse_args()
    category = find_categories(args.data)[0]
    step = max(1, len(category.train) // args.train)
    detector = Detector(
        backbone=args.backbone,
        image_size=args.image_size,
        precision=args.precision,
        dense_map=args.dense_map,
    )
    start = time.perf_counter()
    detector.fit(category.train[::step][: args.train])
    fit_seconds = time.perf_counter() - start
    bank = detector.method_.memory_bank_.shape
    step = max(1, len(category.test) // args.test)
    images = [
        LoadedImage(str(s.path), load_image(s.path)) for s in category.test[::step][: args.test]
    ]
    backbone = detector.backbone_
    backbone.features([images[0].image])  # warm-up
    backbone_ms, predict_ms = [], []
    for item in images:
        start = time.perf_counter()
        backbone.features([item.image], dense=detector.dense_map)
        backbone_ms.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        next(detector.predict_images([item]))
        predict_ms.append(1000 * (time.perf_counter() - start))
    total, alone = sum(predict_ms), sum(backbone_ms)
    print(f"fit on {args.train} images: {fit_seconds:.1f} s, bank {bank[0]} x {bank[1]}")
    print(
        "| backbone | precision | map | image size | backbone ms/img | predict ms/img | "
        "overhead share |\n|---|---|---|---|---|---|---|"
    )
    print(
        f"| {args.backbone} | {backbone.precision} | {'dense' if args.dense_map else 'plain'} | "
        f"{args.image_size} | "
        f"{statistics.mean(backbone_ms):.0f} | {statistics.mean(predict_ms):.0f} | "
        f"{100 * (total - alone) / total:.1f}% |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
