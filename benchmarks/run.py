"""Accuracy, speed and memory of normalcy settings on an MVTec-layout category.

Each row runs `normalcy eval` in its own process, so peak RSS is that row's alone. Prints a
markdown table and writes every row's JSON to bench-results/.

    python benchmarks/run.py                      # the 224 px rows on magnetic_tile
    python benchmarks/run.py --rows lite0-224-full   # chosen rows only
    python benchmarks/run.py --rows dinov2-448-full --train-every 4 --test-every 3
                                                    # on a linked subsample, for slow rows
    python benchmarks/run.py --data ../shared/data/deeppcb/pcb --rows dinov2-224-full \
        dinov2-224-tiles1 --train-every 4 --test-every 4   # another data set: pcb-* files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from normalcy.datasets import find_categories, link_subsample
from normalcy.evaluate import METRIC_KEYS

QUALITY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mtd" / "magnetic_tile"

# name -> normalcy eval options
DRAWS = ["--draws", "3"]  # few-shot rows: mean and spread over three reference draws


def _rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for size in ("224", "448"):
        base = ["--backbone", "dinov2_vits14", "--image-size", size]
        rows[f"dinov2-{size}-full"] = base
        # Maps from the half-stride grid of four shifted passes: finer outlines, 4x the time.
        rows[f"dinov2-{size}-full-dense"] = [*base, "--dense-map"]
        # float32 arithmetic throughout (what CPUs without bfloat16 instructions run).
        rows[f"dinov2-{size}-full-float32"] = [*base, "--precision", "float32"]
        # Without the image-context half of the descriptor (the default before it existed).
        rows[f"dinov2-{size}-full-nocontext"] = [*base, "--context", "0"]
        # Maps without gap filling (the default before it existed).
        rows[f"dinov2-{size}-full-noclosing"] = [*base, "--closing", "1"]
        for shots in (1, 2, 4, 8, 16):
            rows[f"dinov2-{size}-{shots}shot"] = [*base, "--shots", str(shots), *DRAWS]
        rows[f"dinov2-{size}-gaussian"] = [*base, "--method", "gaussian"]
        # Only the principal components holding the smallest 1% of the variance (Rippel et al.).
        rows[f"dinov2-{size}-gaussian-lowvar"] = [
            *base,
            *("--method", "gaussian", "--low-variance", "0.01"),
        ]
        # One Gaussian over blocks spread through the network (Rippel et al. use every level).
        rows[f"dinov2-{size}-gaussian-blocks"] = [
            *base,
            *("--method", "gaussian", "--layers", "2", "5", "8", "11"),
        ]
        rows[f"dinov2-{size}-fused"] = [*base, "--method", "patchknn+gaussian"]
        # Tiles of the input size at the image's own resolution (small defects, large images).
        rows[f"dinov2-{size}-tiles1"] = [*base, "--tile-scale", "1"]
        rows[f"dinov2-{size}-mutual"] = [*base, "--method", "mutual"]
        # Zero-shot with MuSc's neighbourhood sizes and image re-scoring (the default before).
        rows[f"dinov2-{size}-mutual-musc"] = [
            *base,
            *("--method", "mutual", "--mutual-sizes", "1", "3", "5", "--mutual-rescore", "8"),
        ]
    lite = ["--backbone", "efficientnet_lite0", "--image-size", "224"]
    rows["lite0-224-full"] = lite
    rows["lite0-224-1shot"] = [*lite, "--shots", "1", *DRAWS]
    # Small defects on large images: the stride-8 grid on tiles at 1x and 2x the image's size.
    rows["lite0-224-tiles1"] = [*lite, "--tile-scale", "1"]
    rows["lite0-224-tiles2"] = [*lite, "--tile-scale", "2"]
    rows["lite0-224-tiles2-nocontext"] = [*lite, "--tile-scale", "2", "--context", "0"]
    # The named settings for fine detail (normalcy.setting.SETTINGS): tiles at 2x without
    # context or gap filling; and with the stride-16 block alone, whose broader responses
    # cover a defect's extent.
    rows["lite0-224-tiles2-nocontext-noclosing"] = ["--setting", "fine-detail"]
    rows["lite0-224-tiles2-block10"] = ["--setting", "fine-detail-outline"]
    # No options: fit chooses its setting from the normal images (the default of fit).
    rows["auto"] = []
    return rows


ROWS = _rows()
# The 448 px and tiled rows take 4-40x longer; run them by name, on a subsample (see README).
DEFAULT_ROWS = [name for name in ROWS if "-448-" not in name and "tiles" not in name]


def run_row(name: str, data: Path, out: Path, subsample: str, prefix: str = "") -> dict:
    target = out / f"{prefix}{name}{_file_tag(subsample)}.json"
    command = [
        sys.executable,
        "-m",
        "normalcy.cli",
        "eval",
        str(data),
        *ROWS[name],
        "--json",
        str(target),
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    summary = json.loads(target.read_text())
    (setting,) = summary["settings"]
    row = {**setting["mean"], "n_train": summary["results"][0]["n_train"]}
    row["spread"] = setting["spread"]
    row["name"] = prefix + name + subsample
    return row


def _file_tag(subsample: str) -> str:
    """' (train 1/4, test 1/4)' -> '-train1of4-test1of4', for file names."""
    words = subsample.strip(" ()").replace("/", "of").replace(" ", "").split(",")
    return "".join(f"-{w}" for w in words if w)


def markdown(rows: list[dict]) -> str:
    head = ["setting", "n_train", *METRIC_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], str(row["n_train"])]
        for key in METRIC_KEYS:
            value = row[key]
            cell = "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.0f}"
            spread = (row.get("spread") or {}).get(key)
            if spread is not None and key in QUALITY_KEYS:
                cell += f" ± {spread:.3f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one MVTec category")
    parser.add_argument(
        "--rows", nargs="+", choices=sorted(ROWS), default=DEFAULT_ROWS, help="default: 224 px rows"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--train-every", type=int, default=1, help="use every n-th train image")
    parser.add_argument("--test-every", type=int, default=1, help="use every n-th test image")
    args = parser.parse_args()
    if not (args.data / "train" / "good").is_dir():
        print(f"no MVTec-layout category at {args.data}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    subsample = ""
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if args.train_every > 1 or args.test_every > 1:
            subsample = f" (train 1/{args.train_every}, test 1/{args.test_every})"
            category = find_categories(args.data)[0]
            data = link_subsample(
                category, Path(scratch) / category.name, args.train_every, args.test_every
            )
        # Rows of another data set than Magnetic Tile are named after it.
        prefix = "" if args.data == DEFAULT_DATA else f"{args.data.name}-"
        rows = [run_row(name, data, args.out, subsample, prefix) for name in args.rows]
    table = markdown(rows)
    print(table)
    tag = (f"-{args.data.name}" if prefix else "") + _file_tag(subsample)
    (args.out / f"table{tag}.md").write_text(table + "\n")
    (args.out / f"rows{tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
