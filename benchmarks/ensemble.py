"""Does an ensemble of two backbones outline small defects better than the better one alone?

Fits two full-shot patch-kNN detectors on tiles, each with the library's own `fit`: the board
setting (EfficientNet-Lite0, tiles at 2x, no context, `--closing 1`, block 10) and DINOv2
ViT-S/14 on tiles at 1x, both on the same normal images but the last tenth, which are held
out. Every test image is scored by both; each one's map and image score are standardised by
the mean and spread of that detector's scores on the held-out normal images (so neither scale
dominates), and the ensemble is their average. Prints image AUROC, pixel AUROC and AUPRO of
each detector and of the ensemble; writes JSON.

    python benchmarks/ensemble.py ../shared/data/deeppcb/pcb --train-every 10 --test-every 5
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from common import subsample_arguments, subsampled, write_json

from normalcy import Detector
from normalcy.datasets import load_mask
from normalcy.metrics import aupro, image_auroc, pixel_auroc

DETECTORS = {
    "Lite0, tiles at 2x, block 10": {
        "backbone": "efficientnet_lite0",
        "tile_scale": 2,
        "context": 0,
        "closing": 1,
        "layers": (10,),
    },
    "DINOv2, tiles at 1x": {"backbone": "dinov2_vits14", "tile_scale": 1, "closing": 1},
}


def standardised(detector: Detector, held: list, test: list) -> tuple[list, list[np.ndarray]]:
    """Image scores and full-size maps of the test images, in units of the spread of the
    held-out normal images' scores (image scores) and map values (maps)."""
    normal = list(detector.predict_iter(held))
    score_mean = np.mean([p.score for p in normal])
    score_std = np.std([p.score for p in normal]) + 1e-12
    values = np.concatenate([p.score_map.ravel() for p in normal])
    map_mean, map_std = values.mean(), values.std() + 1e-12
    scores, maps = [], []
    for prediction in detector.predict_iter(test):
        scores.append((prediction.score - score_mean) / score_std)
        maps.append((prediction.anomaly_map - map_mean) / map_std)
    return scores, maps


def main() -> int:
    args = subsample_arguments(__doc__, "ensemble.json")
    with tempfile.TemporaryDirectory() as tmp:
        category = subsampled(args.data, Path(tmp), args.train_every, args.test_every)
        cut = len(category.train) - max(2, len(category.train) // 10)
        fit, held = category.train[:cut], category.train[cut:]
        test = [s.path for s in category.test]
        labels = [s.label for s in category.test]
        masks = []
        results: dict[str, tuple[list, list[np.ndarray]]] = {}
        for name, options in DETECTORS.items():
            detector = Detector(**options).fit(fit)
            results[name] = standardised(detector, held, test)
            print(f"scored with {name}", flush=True)
        for sample, image_map in zip(category.test, next(iter(results.values()))[1], strict=True):
            size = image_map.shape
            masks.append(
                load_mask(sample.mask_path, size) if sample.mask_path else np.zeros(size, bool)
            )
    first, second = results.values()
    results["ensemble (mean of the two, standardised)"] = (
        [(a + b) / 2 for a, b in zip(first[0], second[0], strict=True)],
        [(a + b) / 2 for a, b in zip(first[1], second[1], strict=True)],
    )
    rows = [
        {
            "setting": name,
            "image_auroc": image_auroc(labels, scores),
            "pixel_auroc": pixel_auroc(masks, maps),
            "aupro": float(aupro(masks, maps)),
        }
        for name, (scores, maps) in results.items()
    ]
    result = {
        "data": str(args.data),
        "n_fit": len(fit),
        "n_held_out": len(held),
        "n_test": len(test),
        "rows": rows,
    }
    print("| setting | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['setting']} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | "
            f"{row['aupro']:.4f} |"
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
