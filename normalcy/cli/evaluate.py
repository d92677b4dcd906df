"""`normalcy eval` (metrics on a data set in the MVTec layout) and `normalcy demo` (the same
on a built-in sample set, with a report)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np

from normalcy.cli.options import detector_options, fitted_detector_from
from normalcy.data import ImageLoadError
from normalcy.datasets import TestSample
from normalcy.detector import MUTUAL, Detector
from normalcy.evaluate import evaluate, format_defect_table, format_table, summarize
from normalcy.inputs import expand_inputs, load_many
from normalcy.methods import METHODS
from normalcy.methods.fused import KNNGaussianFusion
from normalcy.prediction import Prediction
from normalcy.report import ReportImage, report_image, write_report
from normalcy.selection import Selection, planted_set, score_planted, split
from normalcy.visualize import write_atomic

FUSED = KNNGaussianFusion.name
EVAL_ALL = ["patchknn", "gaussian", FUSED, MUTUAL]  # what `eval --method all` compares


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="benchmark on an MVTec-layout dataset")
    ev.add_argument("dataset_root", nargs="?", help="MVTec-layout data (or use --planted)")
    ev.add_argument(
        "--planted",
        metavar="NORMAL_DIR",
        help="no defect images: estimate image AUROC and AUPRO on defects planted into normal "
        "images (synthetic), fitting the setting on two thirds and planting into the rest",
    )
    ev.add_argument(
        "--model", help="with --planted: measure this fitted model, planting into every image"
    )
    ev.add_argument("--category", action="append", help="category to evaluate (repeatable)")
    detector_options(ev, [*sorted(METHODS), MUTUAL, "all"])
    ev.add_argument("--seed", type=int, default=0, help="first few-shot reference draw")
    ev.add_argument(
        "--draws", type=int, default=1, help="few-shot: reference draws to average (seed, seed+1..)"
    )
    ev.add_argument(
        "--fpr",
        type=float,
        default=0.01,
        help="target false-positive rate of the threshold (its achieved rate is reported)",
    )
    ev.add_argument("--json", help="write the results JSON here")
    ev.add_argument("--report", help="write an HTML report here")
    ev.add_argument("--progress", action="store_true", help="show progress bars")
    ev.set_defaults(func=cmd_eval)


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="fit and evaluate on a built-in sample set, write a report")
    demo.add_argument("-o", "--output", default="normalcy-demo", help="output folder")
    detector_options(demo, [*sorted(METHODS), MUTUAL, "all"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--draws", type=int, default=1)
    demo.add_argument(
        "--synthetic",
        action="store_true",
        help="use a generated fabric set instead of the embedded real circuit boards",
    )
    demo.set_defaults(func=cmd_demo)


def run_eval(
    root: str | os.PathLike,
    args: argparse.Namespace,
    categories: Sequence[str] | None,
    report: str | os.PathLike | None,
) -> dict:
    report_images: list[ReportImage] = []
    thresholds: list[float] = []

    def hook_for(category: str):
        if not report:
            return None

        def keep(sample: TestSample, image: np.ndarray, prediction: Prediction) -> None:
            report_images.append(report_image(prediction, image, sample.label, category))
            if not thresholds and prediction.threshold is not None:
                thresholds.append(prediction.threshold)

        return keep

    methods = EVAL_ALL if args.method == "all" else [args.method]  # None: the setting's
    if args.method == "all" and args.shots:
        methods = [m for m in methods if m != FUSED]  # it needs held-out normal images
    target = {"fpr": args.fpr} if "fpr" in args else {}  # demo: the default
    results = []
    for method in methods:
        results += evaluate(
            root,
            categories,
            make_detector=lambda method=method: fitted_detector_from(
                args, method=method, progress=args.progress, **target
            ),
            seeds=range(args.seed, args.seed + args.draws),
            on_sample=hook_for,
        )
    summary = summarize(results)
    if report:
        write_report(
            report,
            f"normalcy eval: {Path(root).name}",
            report_images,
            thresholds[0] if thresholds else 0.0,
            metrics=[
                {k: v for k, v in row.items() if k not in ("by_defect", "selection")}
                for row in summary["results"]
            ],
            breakdown=[
                {"category": row["category"], "method": row["method"], **defect}
                for row in summary["results"]
                for defect in row["by_defect"]
            ],
            choices=[
                {"category": row["category"], **trial, "chosen": trial["name"] == chosen}
                for row in summary["results"]
                if row["selection"]
                for chosen in [row["selection"]["chosen"]]
                for trial in row["selection"]["trials"]
            ],
        )
    return summary


def print_summary(summary: dict) -> None:
    for row in summary["results"]:
        if row["selection"]:
            choice = Selection.from_json(row["selection"])
            print(f"{row['category']}: setting {choice.chosen} chosen\n{choice.table()}")
    print(format_table(summary))
    defects = format_defect_table(summary)
    if defects:
        print(defects)


def run_planted(args: argparse.Namespace) -> dict:
    """eval --planted: a setting fitted on two thirds of the normal images (or a fitted
    model), scored on the rest as they are, varied, and with defects planted into them."""
    sources = expand_inputs(args.planted)
    if args.model:
        detector = Detector.load(args.model, weights=args.weights, device=args.device)
        fit, held = [], sources
    else:
        fit_at, held_at = split(len(sources), args.seed, len(sources), len(sources))
        fit, held = [sources[i] for i in fit_at], [sources[i] for i in held_at]
        detector = fitted_detector_from(args, progress=args.progress).fit(fit)
    loaded = [item for item in load_many(held) if not isinstance(item, ImageLoadError)]
    planted = planted_set([item.image for item in loaded], args.seed)
    auroc, region_overlap, predictions = score_planted(detector, planted)
    row = {
        "normal_dir": str(args.planted),
        "model": args.model,
        "setting": detector.active_setting.to_json(),
        "fitted_on": len(fit),
        "normal_images": len(loaded),
        "planted_images": sum(planted.labels),
        "planted_image_auroc": auroc,
        "planted_aupro": region_overlap,
    }
    if args.report:
        write_report(
            args.report,
            f"normalcy eval --planted {Path(args.planted).name}: SYNTHETIC defects",
            [
                report_image(p, image, label, f"synthetic: {kind}" if label else kind)
                for p, image, label, kind in zip(
                    predictions, planted.images, planted.labels, planted.kinds, strict=True
                )
            ],
            detector.threshold_ or 0.0,
            metrics=[{k: v for k, v in row.items() if k != "setting"}],
        )
    return row


def cmd_eval(args: argparse.Namespace) -> int:
    if args.planted:
        row = run_planted(args)
        print(
            f"on {row['planted_images']} defects planted into {row['normal_images']} normal "
            f"images (synthetic, not real defects): image AUROC "
            f"{row['planted_image_auroc']:.3f}, AUPRO {row['planted_aupro']:.3f}"
        )
        summary: dict = {"planted": row}
    elif args.dataset_root is None:
        raise ValueError("eval needs DATASET_ROOT, or --planted NORMAL_DIR without defect images")
    else:
        summary = run_eval(args.dataset_root, args, args.category, args.report)
        print_summary(summary)
    if args.json:
        write_atomic(args.json, (json.dumps(summary, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    if args.report:
        print(f"wrote {args.report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.synthetic:
        from normalcy.synthetic import make_demo_dataset

        dataset = make_demo_dataset(out / "data")
        print(f"made a sample inspection set in {dataset}")
    else:
        dataset = out / "data" / "pcb"
        with as_file(files("normalcy") / "demo_data") as embedded:
            shutil.copytree(embedded / "pcb", dataset, dirs_exist_ok=True)
            shutil.copy(embedded / "LICENSE", dataset.parent / "LICENSE")
        print(f"copied the demo's circuit boards (DeepPCB subset, MIT licence) to {dataset}")
    args.progress = True
    report = out / "report.html"
    summary = run_eval(dataset, args, None, report)
    print_summary(summary)
    write_atomic(out / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"report: {report.resolve()}")
    return 0
