"""How exactly exported models score like the library, on real images.

For each data set: fits the default model (DINOv2 ViT-S/14 at 224 px, patch kNN) on every
`--train-every`-th normal image, exports it at the commonest network input size of the test
images, and scores every test image of that size with the library (float32, and the default
precision) and with `normalcy.runtime` on each engine (OpenVINO also in bfloat16). Prints, per
engine, the largest relative score difference, the largest map difference as a share of the
map's range, and the share of identical decisions; writes JSON.

    python benchmarks/parity.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ENGINE_SETTINGS
from PIL import Image

from normalcy import Detector, runtime
from normalcy.datasets import find_categories
from normalcy.export import export_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SETS = ("mtd/magnetic_tile", "deeppcb/pcb")


def deviations(ours: list, theirs: list) -> dict:
    """Largest score and map differences and decision agreement of two prediction lists."""
    scores = [abs(a.score - b.score) / abs(b.score) for a, b in zip(ours, theirs, strict=True)]
    maps = [
        float(np.abs(a.anomaly_map - b.anomaly_map).max() / (np.ptp(b.anomaly_map) or 1.0))
        for a, b in zip(ours, theirs, strict=True)
    ]
    same = [a.is_anomalous == b.is_anomalous for a, b in zip(ours, theirs, strict=True)]
    return {
        "images": len(ours),
        "max_score_relative": max(scores),
        "max_map_of_range": max(maps),
        "same_decisions": float(np.mean(same)),
    }


def measure(dataset: str, train_every: int, scratch: Path) -> dict:
    category = find_categories(DATA / dataset)[0]
    detector = Detector().fit(category.train[::train_every])
    model = detector.save(scratch / "model")
    by_size: dict[tuple[int, int], list[Path]] = {}
    for sample in category.test:
        with Image.open(sample.path) as image:
            size = detector.backbone_.input_size(image.height, image.width)
        by_size.setdefault(size, []).append(sample.path)
    size, paths = max(by_size.items(), key=lambda item: len(item[1]))
    folder = export_model(model, scratch / "exported", size=size)
    library = Detector.load(model, precision="float32").predict(paths)
    result = {"dataset": dataset, "network_size": list(size), "engines": {}}
    for engine, (name, precision) in ENGINE_SETTINGS.items():
        try:
            exported = runtime.load(folder, name, precision)
        except ImportError as missing:
            print(f"{engine}: skipped ({missing})", file=sys.stderr)
            continue
        result["engines"][engine] = deviations(exported.predict(paths), library)
    # What a model fitted in bfloat16 (`auto` on such CPUs) loses against its float32 export.
    default = Detector.load(model).predict(paths)
    result["library_default_precision"] = {
        "precision": Detector.load(model).backbone_.precision,
        **deviations(default, library),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-every", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "parity.json")
    args = parser.parse_args()
    results = []
    for dataset in SETS:
        if not (DATA / dataset).is_dir():
            print(f"{DATA / dataset} is absent: skipped", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as scratch:
            results.append(measure(dataset, args.train_every, Path(scratch)))
    lines = [
        "| data set | input | against float32 library | images | max score rel. diff | "
        "max map diff / range | same decisions |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        rows = {
            **result["engines"],
            "library, default precision": result["library_default_precision"],
        }
        for name, row in rows.items():
            lines.append(
                f"| {result['dataset']} | {result['network_size'][0]} x "
                f"{result['network_size'][1]} | {name} | {row['images']} | "
                f"{row['max_score_relative']:.1e} | {row['max_map_of_range']:.1e} | "
                f"{row['same_decisions']:.1%} |"
            )
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
