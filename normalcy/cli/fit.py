"""`normalcy fit` (learn normality from normal images) and `normalcy export` (a fitted model
as a graph for `normalcy.runtime`)."""

from __future__ import annotations

import argparse
import sys

from normalcy.cli.options import detector_options, fitted_detector_from, ray_option
from normalcy.data import probe_image
from normalcy.detector import ZERO_SHOT_HINT, Detector, choose_setting
from normalcy.inputs import expand_inputs
from normalcy.methods import METHODS


def add_fit_command(sub: argparse._SubParsersAction) -> None:
    fit = sub.add_parser("fit", help="learn normality from a folder of normal images")
    fit.add_argument("train_dir")
    fit.add_argument("-o", "--output", required=True, help="model directory to write")
    detector_options(fit, sorted(METHODS))
    fit.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate")
    fit.add_argument("--threshold", type=float, default=None, help="fixed score threshold")
    ray_option(
        fit,
        "fit full-shot patchknn or gaussian on Ray: the backbone passes spread over tasks of "
        "64 images, the same model as on one machine",
    )
    fit.set_defaults(func=cmd_fit)


def add_export_command(sub: argparse._SubParsersAction) -> None:
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


def cmd_fit(args: argparse.Namespace) -> int:
    try:
        sources = expand_inputs(args.train_dir)
    except ValueError as error:
        raise ValueError(f"{error}; {ZERO_SHOT_HINT}") from error
    if args.ray is not None:
        from normalcy import distributed

        detector = fitted_detector_from(args, fpr=args.fpr, threshold=args.threshold)
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
    if args.method is None and args.shots is None:
        _, args.shots = choose_setting(len(readable))
    detector = fitted_detector_from(args, fpr=args.fpr, threshold=args.threshold, progress=True)
    if args.method is None:
        shots = f"{args.shots}-shot" if args.shots else "full-shot"
        print(
            f"{len(readable)} normal images: fitting {detector.active_setting.method} {shots}",
            file=sys.stderr,
        )
    return _saved(args, detector.fit(readable), unreadable)


def _saved(args: argparse.Namespace, detector: Detector, unreadable: list[str]) -> int:
    """Save a fitted detector to -o and say what it learnt from and what it skipped."""
    path = detector.save(args.output)
    selection = getattr(detector, "selection_", None)
    if selection is not None:
        print(
            f"setting {selection.chosen}: of {len(selection.trials)} candidates, each fitted on "
            f"{selection.fit_images} normal images, it found best the "
            f"{selection.planted_images} defects planted into {selection.held_images} others\n"
            + selection.table()
        )
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
