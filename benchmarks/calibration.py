"""Do decisions keep their stated false-positive rate? On each dev set: fit the default
detector on all of train/good, score the test set, and for each target rate set the threshold
from the fit's calibration scores as `fit --fpr` would; report the rate achieved on the good
test images (never seen by the fit) and the recall on the defective ones.

    python benchmarks/calibration.py            # both dev sets, about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from normalcy import Detector
from normalcy.calibration import achieved_rates, conformal_threshold
from normalcy.data import ImageLoadError
from normalcy.datasets import find_categories
from normalcy.inputs import load_many

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"magnetic_tile": DATA / "mtd" / "magnetic_tile", "pcb": DATA / "deeppcb" / "pcb"}
RATES = (0.01, 0.05)


def measure(name: str, root: Path) -> dict:
    category = find_categories(root)[0]
    detector = Detector(progress=True)
    start = time.perf_counter()
    detector.fit(category.train)
    fit_seconds = time.perf_counter() - start
    labels, scores = [], []
    decoded = load_many([s.path for s in category.test], min_side=detector.decode_side)
    for sample, item in zip(category.test, decoded, strict=True):
        if isinstance(item, ImageLoadError):
            continue
        labels.append(sample.label)
        scores.append(next(detector.predict_images([item])).score)
    labels_array, scores_array = np.array(labels), np.array(scores)
    rows = []
    for rate in RATES:
        threshold = conformal_threshold(detector.normal_scores_, rate)
        fpr, recall = achieved_rates(labels_array, scores_array, threshold)
        rows.append(
            {"target_fpr": rate, "threshold": threshold, "achieved_fpr": fpr, "recall": recall}
        )
    return {
        "dataset": name,
        "n_train": detector.n_train_,
        "calibration": detector.calibration_.to_json(),
        "n_test_good": int((labels_array == 0).sum()),
        "n_test_defective": int((labels_array == 1).sum()),
        "fit_seconds": fit_seconds,
        "rates": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "calibration.json")
    args = parser.parse_args()
    results = [measure(name, DATASETS[name]) for name in args.datasets]
    print("| data set | normal images (calibrating) | target FPR | achieved FPR, good | recall |")
    print("|---|---|---|---|---|")
    for result in results:
        for row in result["rates"]:
            print(
                f"| {result['dataset']} | {result['n_train']} ({result['calibration']['images']}) "
                f"| {row['target_fpr']:.0%} | {row['achieved_fpr']:.1%} of "
                f"{result['n_test_good']} | {row['recall']:.1%} of {result['n_test_defective']} |"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
