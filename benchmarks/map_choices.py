"""Which way to a fine anomaly map pays: accuracy of map choices against their backbone passes.

Fits one detector (full-shot patch kNN at the defaults) on an MVTec-layout category, then
scores every test image once on the half-stride grid of four shifted backbone passes, and
derives from the same scores every choice compared:

- plain: the plain grid (1 pass), with bicubic (the default) or bilinear upsampling;
- diagonal: the plain grid plus one pass shifted half a patch down and right (2 passes), the
  other half-stride positions filled with the mean of their four neighbours;
- dense: all four passes (4 passes, `--dense-map`), bicubic or bilinear.

It also compares the image score computed on the map at the fixed scale of the patch grid
(the default) with the same score on the map at the image's full size (the old way). Prints a
table and writes JSON.

    python benchmarks/map_choices.py ../shared/data/mtd/magnetic_tile
    python benchmarks/map_choices.py ../shared/data/deeppcb/pcb --train-every 2 --test-every 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from normalcy import Detector
from normalcy.datasets import find_categories, link_subsample, load_mask
from normalcy.inputs import load_many
from normalcy.metrics import aupro, image_auroc, pixel_auroc
from normalcy.pipeline import MapSettings
from normalcy.postprocess import UPSAMPLING, anomaly_map, image_score, ranking_score
from normalcy.prediction import resize_map

# name -> (backbone passes, grid, upsampling)
CHOICES = {
    "plain, bilinear": (1, "plain", "bilinear"),
    "plain, bicubic (default)": (1, "plain", "bicubic"),
    "diagonal, bicubic": (2, "diagonal", "bicubic"),
    "dense, bilinear": (4, "dense", "bilinear"),
    "dense, bicubic": (4, "dense", "bicubic"),
}


def diagonal_grid(dense: torch.Tensor) -> torch.Tensor:
    """A half-stride grid from the plain positions (even, even) and the diagonal pass's (odd,
    odd); each other position is the mean of its known neighbours above, below, left, right."""
    known = torch.zeros_like(dense, dtype=torch.bool)
    known[::2, ::2] = True
    known[1::2, 1::2] = True
    values = torch.where(known, dense, torch.zeros_like(dense))
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).to(dense)[None, None]
    total = F.conv2d(values[None, None], kernel, padding=1)[0, 0]
    count = F.conv2d(known[None, None].float(), kernel, padding=1)[0, 0]
    return torch.where(known, dense, total / count.clamp(min=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="one MVTec-layout category")
    parser.add_argument("--train-every", type=int, default=1)
    parser.add_argument("--test-every", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        category = find_categories(args.data)[0]
        if args.train_every > 1 or args.test_every > 1:
            root = link_subsample(
                category, Path(tmp) / category.name, args.train_every, args.test_every
            )
            category = find_categories(root)[0]
        detector = Detector(image_size=args.image_size)
        start = time.perf_counter()
        detector.fit(category.train)
        fit_s = time.perf_counter() - start
        labels, fixed_scale, full_size = [], [], []
        maps: dict[str, list[np.ndarray]] = {name: [] for name in CHOICES}
        masks = []
        backbone, method = detector.backbone_, detector.method_
        upsampled = {
            mode: MapSettings(detector.active_setting.sigma, detector.active_setting.closing, mode)
            for mode in UPSAMPLING
        }
        paths = [s.path for s in category.test]
        decoded = load_many(
            paths, min_side=detector.active_setting.image_size
        )  # as predict decodes them
        for sample, item in zip(category.test, decoded, strict=True):
            (dense_grid,) = backbone.features([item.image], dense=True)
            dense = method.score_batch([dense_grid])[0].patches
            plain = dense[::2, ::2]
            size = item.size
            labels.append(sample.label)
            fixed_scale.append(ranking_score(plain, detector.active_setting.sigma))
            full_size.append(image_score(anomaly_map(plain, size, detector.active_setting.sigma)))
            grids = {"plain": plain, "diagonal": diagonal_grid(dense), "dense": dense}
            for name, (_, grid, mode) in CHOICES.items():
                shown = upsampled[mode].shown_map(grids[grid], dense=grid != "plain")
                maps[name].append(resize_map(shown, size))
            masks.append(
                load_mask(sample.mask_path, size)
                if sample.mask_path is not None
                else np.zeros(size, dtype=bool)
            )
    rows = []
    for name, (passes, _, _) in CHOICES.items():
        rows.append(
            {
                "map": name,
                "backbone_passes": passes,
                "pixel_auroc": pixel_auroc(masks, maps[name]),
                "aupro": aupro(masks, maps[name]),
            }
        )
        maps[name] = []  # free the memory before the next metric
    result = {
        "data": str(args.data),
        "n_train": detector.n_train_,
        "n_test": len(labels),
        "image_size": args.image_size,
        "fit_seconds": fit_s,
        "cpu": platform.processor() or platform.machine(),
        "image_auroc_fixed_scale": image_auroc(labels, fixed_scale),
        "image_auroc_full_size": image_auroc(labels, full_size),
        "maps": rows,
    }
    print(
        f"{args.data}: {result['n_train']} normal, {result['n_test']} test images; image AUROC "
        f"{result['image_auroc_fixed_scale']:.4f} (score at the fixed scale) against "
        f"{result['image_auroc_full_size']:.4f} (score at image size)"
    )
    print("| map | backbone passes | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['map']} | {row['backbone_passes']} | {row['pixel_auroc']:.4f} | "
            f"{row['aupro']:.4f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
