"""Golden-template accuracy on DeepPCB's paired boards: each image against its own template.

DeepPCB pairs every tested board `test/defect/<stem>.png` (a separate capture, with its
defects) with its aligned defect-free template `test/good/<stem>_temp.png`. The data set has
no second defect-free capture of a board, so the normal side of each pair is built from the
tested image itself: its defect boxes restored from the template ("repaired"). Outside the
boxes (about 98% of the board) it keeps the real capture's differences from the template
(noise, edges, misalignment), which is what a golden comparison must tolerate.

For every pair: a `golden` detector fitted on the template alone scores the tested image
(anomalous) and the repaired one (normal). Prints image AUROC, pixel AUROC and AUPRO over all
of them (box masks; repaired images have empty masks) and writes bench-results/golden-pairs*.json.

    python benchmarks/golden_pairs.py          # every 4th of the 500 pairs, Lite0 tiles at 2x
    python benchmarks/golden_pairs.py --every 1 --backbone dinov2_vits14 --tile-scale 1
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

from normalcy.data import load_image
from normalcy.datasets import load_mask
from normalcy.detector import GOLDEN, Detector
from normalcy.evaluate import peak_rss_mb
from normalcy.metrics import aupro, image_auroc, pixel_auroc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "deeppcb" / "pcb"


def repaired(tested: np.ndarray, template: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The tested image with the pixels inside its defect boxes taken from the template."""
    out = tested.copy()
    out[mask] = template[mask]
    return out


def pairs(data: Path, every: int) -> list[tuple[Path, Path, Path]]:
    """(tested, template, mask) paths of every `every`-th pair, by sorted name."""
    found = []
    for tested in sorted((data / "test" / "defect").glob("*.png"))[::every]:
        template = data / "test" / "good" / f"{tested.stem}_temp.png"
        mask = data / "ground_truth" / "defect" / f"{tested.stem}_mask.png"
        if not (template.is_file() and mask.is_file()):
            raise FileNotFoundError(f"{tested}: no template {template.name} or mask {mask.name}")
        found.append((tested, template, mask))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--every", type=int, default=4, help="every n-th pair (default 4)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tile-scale", type=float, default=2.0, help="0: the whole image")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args()

    # One template leaves no normal image to set a threshold from; AUROC needs none.
    logging.getLogger("normalcy").setLevel(logging.ERROR)
    found = pairs(args.data, args.every)
    if not found:
        raise SystemExit(f"no pairs under {args.data}/test/defect")
    detector = Detector(
        backbone=args.backbone,
        method=GOLDEN,
        image_size=args.image_size,
        tile_scale=args.tile_scale or None,
    )
    labels, scores, masks, maps = [], [], [], []
    started = time.perf_counter()
    for index, (tested_path, template_path, mask_path) in enumerate(found):
        tested, template = load_image(tested_path), load_image(template_path)
        mask = load_mask(mask_path, tested.shape[:2])
        detector.fit([template])  # the backbone is built once and kept
        for image, label, truth in (
            (tested, 1, mask),
            (repaired(tested, template, mask), 0, np.zeros_like(mask)),
        ):
            prediction = detector.predict(image)
            labels.append(label)
            scores.append(prediction.score)
            masks.append(truth)
            maps.append(prediction.anomaly_map)
        print(f"\r{index + 1}/{len(found)} pairs", end="", flush=True)
    seconds = time.perf_counter() - started
    print()
    result = {
        "pairs": len(found),
        "every": args.every,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "tile_scale": args.tile_scale or None,
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps),
        "ms_per_pair": 1000 * seconds / len(found),
        "peak_rss_mb": peak_rss_mb(),
        "cpu": platform.processor() or platform.machine(),
    }
    for key in ("image_auroc", "pixel_auroc", "aupro", "ms_per_pair", "peak_rss_mb"):
        print(f"{key:>12}: {result[key]:.3f}")
    tag = f"-tiles{args.tile_scale:g}" if args.tile_scale else "-whole"
    target = args.out / f"golden-pairs-{args.backbone}{tag}-every{args.every}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
