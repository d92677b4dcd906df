"""The `normalcy` command: fit, predict, eval, serve, demo."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import torch

from normalcy import __version__
from normalcy.backbones import BACKBONES, DEVICES, PRECISIONS
from normalcy.data import ImageLoadError, TestSample, expand_inputs, load_image, probe_image
from normalcy.detector import (
    FUSED,
    GOLDEN,
    MUTUAL,
    ZERO_SHOT_HINT,
    Detector,
    Prediction,
    choose_setting,
)
from normalcy.evaluate import evaluate, format_defect_table, format_table, summarize
from normalcy.methods import METHODS
from normalcy.methods.mutual import MutualScorer
from normalcy.postprocess import SIGMA_AT_256, UPSAMPLING
from normalcy.prediction import resize_map
from normalcy.report import ReportImage, write_report
from normalcy.serving import add_serve_command
from normalcy.visualize import thumbnail, write_atomic, write_map_files

EXIT_SOME_SKIPPED = 3  # predict: some inputs could not be read; the others were scored
RESULTS_EVERY_S = 2.0  # predict -o rewrites results.json at most this often while it runs
REPORT_SIDE = 256
EVAL_ALL = ["patchknn", "gaussian", FUSED, MUTUAL]  # what `eval --method all` compares
METHOD_HELP = (
    "patchknn: nearest normal patch (full- and few-shot); gaussian: Mahalanobis distance to "
    "normal features; patchknn+gaussian: both, standardised and averaged (full-shot); "
    "mutual (eval only): zero-shot, test images score each other. "
    "Default for fit: chosen from the number of normal images"
)


DENSE_MAP_HELP = (
    "draw maps from patches at half the backbone stride: finer outlines for about 4x the "
    "predict time (three more shifted backbone passes); scores, decisions and the fit are the "
    "same either way (default: off)"
)


def _backbone_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, device: bool = True
) -> None:
    parser.add_argument("--backbone", default="dinov2_vits14", choices=sorted(BACKBONES))
    parser.add_argument(
        "--image-size", type=int, default=224, help="short side fed to the backbone (px)"
    )
    parser.add_argument(
        "--tile-scale",
        type=float,
        default=None,
        metavar="S",
        help="inspect in tiles of --image-size px cut from the image resized by S (1: its own "
        "resolution), for defects a few pixels wide; cost grows with pixels: about "
        "(H*S/(N-2c)+1) x (W*S/(N-2c)+1) backbone passes per image for N = --image-size and "
        "c the grid cell (14 px for DINOv2, 8 for efficientnet_lite0), at most 64 (larger "
        "images are tiled at a lower scale); for small defects on boards: --backbone "
        "efficientnet_lite0 --tile-scale 2 --context 0 --closing 1 (and --layers 10 for "
        "tighter outlines); default: the whole "
        "image at --image-size",
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="backbone blocks to use (0-based)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="arithmetic of the backbone and the nearest-neighbour search; auto: bfloat16 where "
        "the device has bfloat16 instructions (faster there), float32 elsewhere",
    )
    if device:
        _device_option(parser)


def _device_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        metavar="{" + ",".join(DEVICES) + "}",
        help="where the backbone, the search and the maps run (also cuda:N); auto: CUDA when "
        "present, then MPS, else the CPU",
    )


def _ray_option(parser: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("on a Ray cluster (pip install 'normalcy[ray]')")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=f"{what}. The cluster: ADDRESS, or without it $RAY_ADDRESS, one started on this "
        "machine (ray start --head), else a new local instance",
    )
    return group


def _map_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sigma",
        type=float,
        default=SIGMA_AT_256,
        metavar="PX",
        help="Gaussian smoothing of the anomaly map, in pixels at a 256-pixel short side of "
        "the image; image scores smooth by the same amount of one backbone input, a tile "
        f"when tiling (default {SIGMA_AT_256:g}; 0: off)",
    )
    parser.add_argument(
        "--upsample",
        default="bicubic",
        choices=UPSAMPLING,
        help="how patch scores are upsampled into the map: bicubic (default) outlines small "
        "defects more tightly; scores and decisions are the same either way",
    )
    parser.add_argument(
        "--closing",
        type=int,
        default=3,
        metavar="N",
        help="fill dips in the anomaly map up to N patches wide, so broad defects that light "
        "up only at their outline are covered (maps and masks only; 1: off)",
    )


def _zero_shot_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zero-shot scoring options (method mutual)")
    group.add_argument(
        "--mutual-sizes",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="patch neighbourhood sizes whose maps are averaged (odd; MuSc uses 1 3 5, which "
        "measured lower here at three times the time)",
    )
    group.add_argument(
        "--mutual-rescore",
        type=int,
        default=0,
        metavar="K",
        help="average each image score with its K most similar images' (0: off; suits batches "
        "that are mostly normal)",
    )


def _scorer(args: argparse.Namespace) -> MutualScorer:
    return MutualScorer(
        neighbourhoods=args.mutual_sizes,
        rescore_neighbours=args.mutual_rescore,
        precision=args.precision,
        sigma=args.sigma,
    )


def _detector_options(parser: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    _backbone_options(parser)
    parser.add_argument("--method", default=None, choices=methods, help=METHOD_HELP)
    parser.add_argument("--shots", type=int, default=None, help="few-shot: use K normal images")
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="few-shot: do not add rotated/mirrored reference views (orientation matters)",
    )
    parser.add_argument("--weights", default=None, help="backbone weights file to use")
    parser.add_argument(
        "--context",
        type=float,
        default=None,
        metavar="W",
        help="weight of each patch's difference from its image's median patch, added to its "
        "features (default 1 for the patchknn methods, 0 for the others; 0: off)",
    )
    parser.add_argument(
        "--dense-map",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=DENSE_MAP_HELP,
    )
    parser.add_argument(
        "--low-variance",
        type=float,
        default=None,
        metavar="FRACTION",
        help="gaussian: keep only the principal components of smallest variance that hold "
        "FRACTION of the variance (Rippel et al.; default: all components)",
    )
    _map_options(parser)
    if MUTUAL in methods:
        _zero_shot_options(parser)


def _make_detector(args: argparse.Namespace, method: str | None = None, **extra) -> Detector:
    chosen = method or args.method or "patchknn"
    if args.low_variance is not None and args.method not in ("gaussian", "all"):
        raise ValueError("--low-variance is an option of --method gaussian")
    return Detector(
        backbone=args.backbone,
        method=chosen,
        shots=args.shots,
        image_size=args.image_size,
        augment=not args.no_augment,
        weights=args.weights,
        layers=args.layers,
        scorer=_scorer(args) if "mutual_sizes" in args else None,
        context=args.context,
        dense_map=args.dense_map,
        sigma=args.sigma,
        closing=args.closing,
        upsample=args.upsample,
        precision=args.precision,
        device=args.device,
        low_variance_fraction=args.low_variance if chosen == "gaussian" else None,
        tile_scale=args.tile_scale,
        **extra,
    )


def cmd_fit(args: argparse.Namespace) -> int:
    try:
        sources = expand_inputs(args.train_dir)
    except ValueError as error:
        raise ValueError(f"{error}; {ZERO_SHOT_HINT}") from error
    if args.ray is not None:
        from normalcy import distributed

        args.method = args.method or "patchknn"
        detector = _make_detector(args, fpr=args.fpr, threshold=args.threshold)
        return _saved(args, distributed.fit(detector, sources, args.ray or None), [])
    # Files that are not images at all are set aside first, so the setting below counts
    # the images the fit will really use.
    probed = [(source, probe_image(source)) for source in sources]
    unreadable = [str(error) for _, error in probed if error is not None]
    readable = [source for source, error in probed if error is None]
    if not readable:
        raise ValueError(
            f"none of the {len(sources)} files in {args.train_dir} is a readable image "
            f"(first: {unreadable[0]})"
        )
    if args.method is None:
        args.method, shots = choose_setting(len(readable))
        args.shots = args.shots or shots
        setting = f"{args.shots}-shot" if args.shots else "full-shot"
        print(f"{len(readable)} normal images: fitting {args.method} {setting}", file=sys.stderr)
    detector = _make_detector(args, fpr=args.fpr, threshold=args.threshold, progress=True)
    return _saved(args, detector.fit(readable), unreadable)


def _saved(args: argparse.Namespace, detector: Detector, unreadable: list[str]) -> int:
    """Save a fitted detector to -o and say what it learnt from and what it skipped."""
    path = detector.save(args.output)
    threshold = "none" if detector.threshold_ is None else f"{detector.threshold_:.4f}"
    print(
        f"saved {path}: {detector.n_train_} normal images, threshold {threshold} "
        f"({detector.threshold_source_})"
    )
    skipped = unreadable + detector.skipped_
    if skipped:
        print(f"{len(skipped)} image(s) could not be read and were skipped:", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)
    return 0


def _unique_stem(name: str, used: set[str]) -> str:
    stem = Path(name).stem if not name.startswith("<") else "image"
    candidate, n = stem, 1
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def _modelless_detector(args: argparse.Namespace, method: str, **extra) -> Detector:
    """A detector from predict's own options, for the modes that need no saved model."""
    return Detector(
        backbone=args.backbone,
        method=method,
        image_size=args.image_size,
        layers=args.layers,
        weights=args.weights,
        threshold=args.threshold,
        progress=not args.json,
        sigma=args.sigma,
        closing=args.closing,
        upsample=args.upsample,
        precision=args.precision,
        device=args.device,
        tile_scale=args.tile_scale,
        **extra,
    )


def cmd_predict(args: argparse.Namespace) -> int:
    if args.ray is not None and args.reference:
        raise ValueError("--ray scores with a saved model or zero-shot: no --reference")
    if args.reference:
        if args.zero_shot or args.dense_map:
            raise ValueError(
                "--reference scores against its image alone: no --zero-shot or --dense-map"
            )
        detector = _modelless_detector(args, GOLDEN).fit([args.reference])
        outcomes = detector.predict_iter(args.paths)
        return _write_predictions(args, detector, outcomes, f"reference {args.reference}")
    if args.zero_shot:
        if args.dense_map:
            raise ValueError("--dense-map is for fitted models; zero-shot maps use the plain grid")
        detector = _modelless_detector(args, MUTUAL, scorer=_scorer(args))
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
        if args.dense_map and (detector.method == GOLDEN or detector.tile_scale is not None):
            raise ValueError(f"{model_dir}: golden and tiled models take no --dense-map")
        detector.dense_map = args.dense_map
    if args.threshold is not None:
        detector.set_threshold(args.threshold)
    return _write_predictions(args, detector, detector.predict_iter(inputs), str(model_dir))


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
        image = load_image(item.name, min_side=REPORT_SIDE)
        report_images.append(_report_image(item, image))
    results.append(row)
    if not args.json:
        decision = {True: "ANOMALOUS", False: "normal", None: "-"}[item.is_anomalous]
        print(f"{tsv_field(item.name)}\t{item.score:.4f}\t{decision}")


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


def _report_image(
    prediction: Prediction, image: np.ndarray, label: int | None = None, group: str = ""
) -> ReportImage:
    """A report entry at thumbnail size, so a report over hundreds of images stays small; its
    map is drawn at that size from the prediction's fixed-scale map, never at full size."""
    small = thumbnail(image, REPORT_SIDE)
    small_map = resize_map(prediction.score_map, small.shape[:2])
    threshold = prediction.pixel_threshold
    return ReportImage(
        name=prediction.name,
        image=small,
        anomaly_map=small_map,
        score=prediction.score,
        is_anomalous=bool(prediction.is_anomalous),
        label=label,
        mask=None if threshold is None else small_map > threshold,
        group=group,
    )


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
            report_images.append(_report_image(prediction, image, sample.label, category))
            if not thresholds and prediction.threshold is not None:
                thresholds.append(prediction.threshold)

        return keep

    methods = EVAL_ALL if args.method == "all" else [args.method or "patchknn"]
    if args.method == "all" and args.shots:
        methods = [m for m in methods if m != FUSED]  # it needs held-out normal images
    target = {"fpr": args.fpr} if "fpr" in args else {}  # demo: the default
    results = []
    for method in methods:
        results += evaluate(
            root,
            categories,
            make_detector=lambda method=method: _make_detector(
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


def _print_summary(summary: dict) -> None:
    print(format_table(summary))
    defects = format_defect_table(summary)
    if defects:
        print(defects)


def cmd_export(args: argparse.Namespace) -> int:
    from normalcy.export import export_model  # imports the ONNX exporter only when asked
    from normalcy.runtime import read_manifest

    size = None if args.image_size is None else tuple(args.image_size)
    out = export_model(args.model, args.output, size, weights=args.weights, format=args.format)
    manifest = read_manifest(out)
    height, width = manifest["input"]["network_size"]
    print(
        f"exported {args.model} to {out}: {manifest['graph']} and export.json, network input "
        f"{height} x {width} px (any image is resized to it)"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    summary = run_eval(args.dataset_root, args, args.category, args.report)
    _print_summary(summary)
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
    _print_summary(summary)
    write_atomic(out / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"report: {report.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normalcy", description="Visual anomaly detection from normal images."
    )
    parser.add_argument("--version", action="version", version=f"normalcy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="learn normality from a folder of normal images")
    fit.add_argument("train_dir")
    fit.add_argument("-o", "--output", required=True, help="model directory to write")
    _detector_options(fit, sorted(METHODS))
    fit.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate")
    fit.add_argument("--threshold", type=float, default=None, help="fixed score threshold")
    _ray_option(
        fit,
        "fit full-shot patchknn or gaussian on Ray: the backbone passes spread over tasks of "
        "64 images, the same model as on one machine",
    )
    fit.set_defaults(func=cmd_fit)

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
    scale_out = _ray_option(
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
    _backbone_options(zero_shot, device=False)
    _map_options(zero_shot)
    _device_option(predict)
    _zero_shot_options(predict)
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser(
        "export",
        help="write a fitted model as an ONNX graph that scores like the library, for "
        "normalcy.runtime (no torch)",
    )
    export.add_argument("model", help="model folder written by `normalcy fit`")
    export.add_argument("-o", "--output", required=True, help="folder for the exported model")
    export.add_argument(
        "--format",
        choices=["onnx", "openvino"],
        default="onnx",
        help="onnx (onnxruntime or OpenVINO run it) or openvino (OpenVINO's own format, which "
        "needs openvino to export; default: onnx)",
    )
    export.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="network input size the graph is fixed at, multiples of the backbone stride "
        "(default: the input size of most training images)",
    )
    export.add_argument("--weights", default=None, help="backbone weights file to use")
    export.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="benchmark on an MVTec-layout dataset")
    ev.add_argument("dataset_root")
    ev.add_argument("--category", action="append", help="category to evaluate (repeatable)")
    _detector_options(ev, [*sorted(METHODS), MUTUAL, "all"])
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

    add_serve_command(sub)

    demo = sub.add_parser("demo", help="fit and evaluate on a built-in sample set, write a report")
    demo.add_argument("-o", "--output", default="normalcy-demo", help="output folder")
    _detector_options(demo, [*sorted(METHODS), MUTUAL, "all"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--draws", type=int, default=1)
    demo.add_argument(
        "--synthetic",
        action="store_true",
        help="use a generated fabric set instead of the embedded real circuit boards",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def return_freed_memory() -> None:
    """Make glibc serve buffers of 16 MiB and more by mmap, so that freed feature tensors go
    back to the OS instead of piling up in the heap (peak RSS grew several-fold without it).

    16 MiB, not lower: at 128 KiB every mid-sized activation is a fresh mmap, and measured
    predict time rose by 70%; at 16 MiB it did not change.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 16 * 1024 * 1024)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return_freed_memory()
    for stream in (sys.stdout, sys.stderr):  # a name no encoding can print never stops a run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if args.threads is not None:
        if args.threads < 1:
            print(f"normalcy: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        print(f"normalcy: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
