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
from normalcy.datasets import TestSample
from normalcy.detector import MUTUAL
from normalcy.evaluate import evaluate, format_defect_table, format_table, summarize
from normalcy.methods import METHODS
from normalcy.methods.fused import KNNGaussianFusion
from normalcy.prediction import Prediction
from normalcy.report import ReportImage, report_image, write_report
from normalcy.visualize import write_atomic

FUSED = KNNGaussianFusion.name
EVAL_ALL = ["patchknn", "gaussian", FUSED, MUTUAL]  # what `eval --method all` compares


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="benchmark on an MVTec-layout dataset")
    ev.add_argument("dataset_root")
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
                {k: v for k, v in row.items() if k != "by_defect"} for row in summary["results"]
            ],
            breakdown=[
                {"category": row["category"], "method": row["method"], **defect}
                for row in summary["results"]
                for defect in row["by_defect"]
            ],
        )
    return summary


def print_summary(summary: dict) -> None:
    print(format_table(summary))
    defects = format_defect_table(summary)
    if defects:
        print(defects)


def cmd_eval(args: argparse.Namespace) -> int:
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
