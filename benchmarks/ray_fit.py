"""A fit on Ray against the same fit on one machine: the bank, the threshold and test accuracy.

Fits the default detector on an MVTec-layout category twice, with `Detector.fit` and with
`distributed.fit` on a local Ray instance, then scores the same test images with both models.
Prints the largest bank difference, both thresholds, both models' image AUROC and AUPRO, and
writes JSON.

    python benchmarks/ray_fit.py ../shared/data/mtd/magnetic_tile --train-every 4 --test-every 4
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import subsample_arguments, subsampled, write_json

from normalcy import Detector, distributed
from normalcy.datasets import load_mask
from normalcy.metrics import aupro, image_auroc


def accuracy(detector: Detector, category) -> dict:
    labels, scores, masks, maps = [], [], [], []
    for sample, prediction in zip(
        category.test, detector.predict_iter([s.path for s in category.test]), strict=True
    ):
        labels.append(sample.label)
        scores.append(prediction.score)
        size = prediction.image_size
        maps.append(prediction.anomaly_map)
        masks.append(
            load_mask(sample.mask_path, size) if sample.mask_path else np.zeros(size, bool)
        )
    return {"image_auroc": image_auroc(labels, scores), "aupro": float(aupro(masks, maps))}


def main() -> int:
    args = subsample_arguments(__doc__, "ray-fit.json")
    with tempfile.TemporaryDirectory() as tmp:
        category = subsampled(args.data, Path(tmp), args.train_every, args.test_every)
        start = time.perf_counter()
        local = Detector().fit(category.train)
        local_s = time.perf_counter() - start
        distributed.connect(None)
        start = time.perf_counter()
        spread = distributed.fit(Detector(), category.train, progress=False)
        spread_s = time.perf_counter() - start
        result = {
            "data": str(args.data),
            "n_train": local.n_train_,
            "n_test": len(category.test),
            "bank_max_abs_difference": float(
                np.abs(local.method_.memory_bank_ - spread.method_.memory_bank_).max()
            ),
            "one_machine": {
                "fit_seconds": local_s,
                "threshold": local.threshold_,
                **accuracy(local, category),
            },
            "ray": {
                "fit_seconds": spread_s,
                "threshold": spread.threshold_,
                **accuracy(spread, category),
            },
        }
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
