"""`normalcy predict`: score images with a saved model, against a golden reference, or
zero-shot against each other; print a line per image and write results, maps and a report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from normalcy.cli.options import (
    DENSE_MAP_HELP,
    backbone_options,
    detector_from,
    device_option,
    map_options,
    ray_option,
    scorer_from,
    zero_shot_options,
)
from normalcy.data import ImageLoadError, load_image
from normalcy.detector import GOLDEN, MUTUAL, Detector
from normalcy.prediction import Prediction
from normalcy.report import THUMBNAIL_SIDE, ReportImage, report_image, write_report
from normalcy.visualize import write_atomic, write_map_files

EXIT_SOME_SKIPPED = 3  # predict: some inputs could not be read; the others were scored
RESULTS_EVERY_S = 2.0  # predict -o rewrites results.json at most this often while it runs


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict",
        help="score images with a saved model, or zero-shot against each other",
        usage="normalcy predict MODEL_DIR INPUT... [options]\n"
        "       normalcy predict --zero-shot INPUT... [options]",
    )
    predict.add_argument(
        "paths", nargs="+", metavar="PATH", help="MODEL_DIR then image files or folders"
    )
    predict.add_argument(
        "--zero-shot",
        action="store_true",
        help="no model: score the inputs against each other (needs at least 3 images)",
    )
    predict.add_argument(
        "--reference",
        metavar="REF",
        help="no model: score each input against this golden twin (an aligned, defect-free "
        "image of the same part at the same size), patch by patch at the same place; "
        "decisions need --threshold",
    )
    predict.add_argument("-o", "--output", help="folder for results.json (and maps)")
    predict.add_argument("--json", action="store_true", help="print JSON to stdout")
    predict.add_argument(
        "--maps", action="store_true", help="with -o: write overlays and .npy maps"
    )
    predict.add_argument("--threshold", type=float, default=None, help="override the threshold")
    predict.add_argument(
        "--dense-map",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=DENSE_MAP_HELP.replace("(default: off)", "(default: as the model was fitted)"),
    )
    predict.add_argument("--report", help="write an HTML report to this file")
    predict.add_argument("--weights", default=None, help="backbone weights file to use")
    scale_out = ray_option(
        predict,
        "score on Ray. Needs -o OUT: rows go to OUT/results-*.parquet as the job goes; a "
        "rerun with the same OUT skips the images already there. Inputs (and OUT with "
        "--maps) must be on storage every worker reads",
    )
    scale_out.add_argument(
        "--actors",
        type=int,
        default=None,
        help="scoring actors, each holding the model once (default: one per GPU of the "
        "cluster, else one per 2 CPUs)",
    )
    scale_out.add_argument(
        "--batch-size", type=int, default=16, help="images per actor call (default 16)"
    )
    zero_shot = predict.add_argument_group("zero-shot feature options")
    backbone_options(zero_shot, device=False)
    map_options(zero_shot)
    device_option(predict)
    zero_shot_options(predict)
    predict.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.ray is not None and args.reference:
        raise ValueError("--ray scores with a saved model or zero-shot: no --reference")
    if args.reference:
        if args.zero_shot or args.dense_map:
            raise ValueError(
                "--reference scores against its image alone: no --zero-shot or --dense-map"
            )
        detector = _modelless(args, GOLDEN).fit([args.reference])
        outcomes = detector.predict_iter(args.paths)
        return _write_predictions(args, detector, outcomes, f"reference {args.reference}")
    if args.zero_shot:
        if args.dense_map:
            raise ValueError("--dense-map is for fitted models; zero-shot maps use the plain grid")
        detector = _modelless(args, MUTUAL, scorer=scorer_from(args))
        if args.ray is not None:
            return _on_ray(args, detector, args.paths)
        return _write_predictions(args, detector, detector.zero_shot(args.paths), "zero-shot")
    if len(args.paths) < 2:
        raise ValueError(
            "predict needs a model folder and at least one image or folder: "
            "normalcy predict MODEL_DIR INPUT... (or normalcy predict --zero-shot INPUT...)"
        )
    model_dir, inputs = args.paths[0], args.paths[1:]
    if args.ray is not None:
        return _on_ray(args, model_dir, inputs)
    detector = Detector.load(model_dir, weights=args.weights, device=args.device)
    detector.progress = not args.json
    if args.dense_map is not None:
        setting = detector.active_setting
        if args.dense_map and (setting.method == GOLDEN or setting.tile_scale is not None):
            raise ValueError(f"{model_dir}: golden and tiled models take no --dense-map")
        detector.dense_map = args.dense_map
    if args.threshold is not None:
        detector.set_threshold(args.threshold)
    return _write_predictions(args, detector, detector.predict_iter(inputs), str(model_dir))


def _modelless(args: argparse.Namespace, method: str, **extra) -> Detector:
    """A detector from predict's own options, for the modes that need no saved model."""
    return detector_from(args, method, threshold=args.threshold, progress=not args.json, **extra)


def _on_ray(args: argparse.Namespace, model: str | Detector, inputs: list[str]) -> int:
    """predict --ray with a model folder, or zero-shot with a detector: results go to
    OUT/results-*.parquet as the job goes."""
    from normalcy import distributed

    if not args.output or args.json or args.report or args.dense_map is not None:
        raise ValueError(
            "--ray writes its results to -o OUT (Parquet files); "
            "it takes no --json, --report or --dense-map"
        )
    address = args.ray or None
    if isinstance(model, Detector):
        summary = distributed.zero_shot(model, inputs, args.output, address)
    else:
        if args.threshold is not None or args.weights is not None or args.device != "auto":
            raise ValueError(
                "--ray scores as the model was saved: no --threshold, --weights or --device "
                "(actors use a GPU where the cluster has one)"
            )
        summary = distributed.predict(
            model, inputs, args.output, address, args.actors, args.batch_size, args.maps
        )
    print(
        f"{summary.scored} scored, {summary.unreadable} unreadable (reasons in the results), "
        f"{summary.already_done} already done by an earlier run; "
        f"{summary.images_per_second:.1f} images/s; results in "
        f"{Path(args.output) / distributed.RESULT_GLOB}"
    )
    if summary.unreadable:
        return 1 if not summary.scored else EXIT_SOME_SKIPPED
    return 0


def _write_predictions(
    args: argparse.Namespace,
    detector: Detector,
    outcomes: Iterable[Prediction | ImageLoadError],
    model: str,
) -> int:
    """Print, and write under -o, each prediction; report unreadable inputs."""
    out = Path(args.output) if args.output else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    # Overlays share one colour scale: from 0 to twice the decision threshold.
    vmax = 2 * detector.threshold_ if detector.threshold_ else None
    results, errors, used = [], [], set()
    report_images = []
    document = {"model": model, "results": results, "errors": errors, "complete": False}
    saved_at = time.monotonic()

    def save_results() -> None:
        if out:
            write_atomic(out / "results.json", (json.dumps(document, indent=2) + "\n").encode())

    try:
        for item in outcomes:
            _record(args, item, out, vmax, results, errors, used, report_images)
            if time.monotonic() - saved_at > RESULTS_EVERY_S:
                save_results()  # an interrupted run keeps what it scored
                saved_at = time.monotonic()
        document["complete"] = True
    finally:
        save_results()
    if args.report:
        write_report(args.report, "normalcy predictions", report_images, detector.threshold_ or 0.0)
    if args.json:
        print(json.dumps(document, indent=2))
    if errors:
        print(
            f"{len(errors)} of {len(errors) + len(results)} inputs could not be read",
            file=sys.stderr,
        )
        return 1 if not results else EXIT_SOME_SKIPPED
    return 0


def _record(
    args: argparse.Namespace,
    item: Prediction | ImageLoadError,
    out: Path | None,
    vmax: float | None,
    results: list[dict],
    errors: list[dict],
    used: set[str],
    report_images: list[ReportImage],
) -> None:
    """One outcome of predict: its row (and maps, report entry), and its printed line."""
    if isinstance(item, ImageLoadError):
        errors.append({"name": item.source, "error": item.reason})
        print(f"error: {tsv_field(item.source)}: {item.reason}", file=sys.stderr)
        return
    row = item.to_json()
    # Images are decoded once more (predict does not keep them), reduced to what is drawn.
    if out and args.maps:
        scale = vmax or float(np.percentile(item.score_map, 99.5))
        row["files"] = write_map_files(out, _unique_stem(item.name, used), item, scale)
    if args.report:
        image = load_image(item.name, min_side=THUMBNAIL_SIDE)
        report_images.append(report_image(item, image))
    results.append(row)
    if not args.json:
        decision = {True: "ANOMALOUS", False: "normal", None: "-"}[item.is_anomalous]
        print(f"{tsv_field(item.name)}\t{item.score:.4f}\t{decision}")


def _unique_stem(name: str, used: set[str]) -> str:
    stem = Path(name).stem if not name.startswith("<") else "image"
    candidate, n = stem, 1
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def tsv_field(name: str) -> str:
    """`name` as one field of a tab-separated line that any terminal prints: backslash, tab,
    newline and other control characters escaped (\\t, \\n, \\xNN), and the bytes of a file name
    that is not UTF-8 (which Python holds as surrogate escapes) shown as \\xNN."""
    escaped = []
    for char in name:
        code = ord(char)
        if char in _TSV_ESCAPES:
            escaped.append(_TSV_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            escaped.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name
            escaped.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            escaped.append(f"\\u{code:04x}")
        else:
            escaped.append(char)
    return "".join(escaped)


_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
