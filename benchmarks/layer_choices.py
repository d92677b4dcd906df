"""Which EfficientNet-Lite0 blocks make the best maps on tiles: one feature pass, banks compared.

Computes the tiled feature grids of Lite0 blocks 4 (stride 8) and 10 (stride 16) once (tiles
at 2x, no context, as recommended for small defects), then builds from them, with the library's
coreset, a bank of both blocks together (the default), of each block alone, of both with three
times the bank size, and scores the same test images with each; "per-block maps averaged"
averages the two single-block maps. Maps as `--closing 1`. Prints a table and writes JSON.

    python benchmarks/layer_choices.py ../shared/data/deeppcb/pcb --train-every 10 --test-every 5
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import subsample_arguments, subsampled, write_json

from normalcy import Detector
from normalcy.datasets import load_mask
from normalcy.inputs import load_many
from normalcy.methods.coreset import StreamingCoreset
from normalcy.methods.patchknn import PatchKNN
from normalcy.metrics import aupro, image_auroc, pixel_auroc
from normalcy.pipeline import MapSettings
from normalcy.postprocess import SIGMA_AT_256, ranking_score
from normalcy.prediction import resize_map

BLOCK4_CHANNELS = 40  # the grid's first channels are block 4's, the rest block 10's
# name -> (channels, bank size)
BANKS = {
    "blocks 4 + 10 (default)": (slice(None), 10_000),
    "block 4 alone": (slice(0, BLOCK4_CHANNELS), 10_000),
    "block 10 alone": (slice(BLOCK4_CHANNELS, None), 10_000),
    "blocks 4 + 10, bank of 30,000": (slice(None), 30_000),
}


def nearest_distances(bank: np.ndarray, grids: list[np.ndarray]) -> list[np.ndarray]:
    search = PatchKNN.from_state(PatchKNN().get_params(), {"memory_bank": bank})
    return [search.score(grid.astype(np.float32)).numpy() for grid in grids]


def main() -> int:
    args = subsample_arguments(__doc__, "layers.json")
    detector = Detector(backbone="efficientnet_lite0", tile_scale=2, context=0, closing=1)
    backbone = detector.backbone_model()
    maps = MapSettings(SIGMA_AT_256, 1, "bicubic", backbone.tile_cells)
    with tempfile.TemporaryDirectory() as tmp:
        category = subsampled(args.data, Path(tmp), args.train_every, args.test_every)

        def grids(paths: list) -> list[tuple[np.ndarray, tuple[int, int]]]:
            loaded = load_many(paths)
            return [
                (backbone.features([i.image])[0].numpy().astype(np.float16), i.size) for i in loaded
            ]

        start = time.perf_counter()
        train = grids(category.train)
        test = grids([s.path for s in category.test])
        features_s = time.perf_counter() - start
        labels = [s.label for s in category.test]
        masks = [
            load_mask(s.mask_path, size) if s.mask_path is not None else np.zeros(size, bool)
            for s, (_, size) in zip(category.test, test, strict=True)
        ]

    def row(name: str, patch_scores: list[np.ndarray]) -> dict:
        shown = [
            resize_map(maps.shown_map(torch.from_numpy(p), dense=False), size)
            for p, (_, size) in zip(patch_scores, test, strict=True)
        ]
        ranked = [
            ranking_score(torch.from_numpy(p), maps.sigma, maps.score_cells) for p in patch_scores
        ]
        return {
            "bank": name,
            "image_auroc": image_auroc(labels, ranked),
            "pixel_auroc": pixel_auroc(masks, shown),
            "aupro": float(aupro(masks, shown)),
        }

    rows, scores = [], {}
    for name, (channels, size) in BANKS.items():
        coreset = StreamingCoreset(0.1, size)
        for grid, _ in train:
            coreset.add(
                grid[..., channels].reshape(-1, grid[..., channels].shape[-1]).astype(np.float32)
            )
        scores[name] = nearest_distances(coreset.finish(), [g[..., channels] for g, _ in test])
        rows.append(row(name, scores[name]))
        print(rows[-1], flush=True)
    averaged = [
        (a + b) / 2 for a, b in zip(scores["block 4 alone"], scores["block 10 alone"], strict=True)
    ]
    rows.append(row("per-block maps averaged", averaged))
    result = {
        "data": str(args.data),
        "n_train": len(train),
        "n_test": len(test),
        "features_seconds": features_s,
        "rows": rows,
    }
    print("| bank | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bank']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} |"
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
