"""What the benchmark scripts share: a linked subsample of a data set, the exported-model
engines they time, and their JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from normalcy.datasets import MVTecCategory, find_categories, link_subsample

# engine name in tables and JSON -> (engine, precision) of `normalcy.runtime.load`
ENGINE_SETTINGS = {
    "onnxruntime": ("onnxruntime", "float32"),
    "openvino": ("openvino", "float32"),
    "openvino-bfloat16": ("openvino", "bfloat16"),
}


ROOT = Path(__file__).resolve().parent.parent


def subsample_arguments(
    doc: str, json_name: str, more: Callable[[argparse.ArgumentParser], object] | None = None
) -> argparse.Namespace:
    """The command line of a benchmark over one data set's subsample: the category, every
    n-th train and test image, and where the JSON goes (default bench-results/`json_name`);
    `more` adds the benchmark's own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if more is not None:
        more(parser)
    parser.add_argument("data", type=Path, help="one MVTec-layout category")
    parser.add_argument("--train-every", type=int, default=1)
    parser.add_argument("--test-every", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / json_name)
    return parser.parse_args()


def subsampled(data: Path, folder: Path, train_every: int, test_every: int) -> MVTecCategory:
    """The first category of `data`, as every n-th train and test image linked under `folder`
    (the category itself when both steps are 1)."""
    category = find_categories(data)[0]
    if train_every == 1 and test_every == 1:
        return category
    root = link_subsample(category, folder / category.name, train_every, test_every)
    return find_categories(root)[0]


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
