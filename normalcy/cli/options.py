"""Option groups that several `normalcy` subcommands share, and the detector they describe."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from normalcy.backbones import BACKBONES, DEVICES, PRECISIONS
from normalcy.detector import MUTUAL, Detector
from normalcy.methods.mutual import MutualScorer
from normalcy.postprocess import UPSAMPLING
from normalcy.selection import CANDIDATES
from normalcy.setting import AUTO, CLI_NAMES, DEFAULT, FIELDS, SETTINGS, Setting, resolve_setting

Parser = argparse.ArgumentParser | argparse._ArgumentGroup

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


def setting_option(parser: Parser) -> None:
    named = "; ".join(
        f"{name}: {' '.join(v.flags()) if v != DEFAULT else 'the defaults'}"
        for name, v in SETTINGS.items()
    )
    parser.add_argument(
        "--setting",
        default=AUTO,
        choices=[*sorted(SETTINGS), AUTO],
        help=f"auto (the default): fit chooses among {', '.join(CANDIDATES)} by how well each "
        "finds defects planted into normal images it was not fitted on, and prints why (with "
        "fewer than 6 images or few-shot, and when any option below is given: the default "
        "setting, changed by it); or a named setting (backbone, input size or tiles, layers, "
        "method, maps), to which the options below make changes: " + named,
    )
    parser.add_argument(
        "--max-ms-per-image",
        type=float,
        default=None,
        metavar="MS",
        help="with --setting auto: choose only settings that predict an image within MS "
        "milliseconds on this machine (measured during the choice)",
    )


def backbone_options(parser: Parser, device: bool = True) -> None:
    parser.add_argument(
        "--backbone",
        default=None,
        choices=sorted(BACKBONES),
        help=f"the frozen feature extractor (default: {DEFAULT.backbone})",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"short side fed to the backbone (px; default {DEFAULT.image_size})",
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
        "images are tiled at a lower scale); for small defects on boards: --setting "
        "fine-detail; default: the whole image at --image-size",
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
        device_option(parser)


def device_option(parser: Parser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        metavar="{" + ",".join(DEVICES) + "}",
        help="where the backbone, the search and the maps run (also cuda:N); auto: CUDA when "
        "present, then MPS, else the CPU",
    )


def ray_option(parser: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
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


def map_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sigma",
        type=float,
        default=None,
        metavar="PX",
        help="Gaussian smoothing of the anomaly map, in pixels at a 256-pixel short side of "
        "the image; image scores smooth by the same amount of one backbone input, a tile "
        f"when tiling (default {DEFAULT.sigma:g}; 0: off)",
    )
    parser.add_argument(
        "--upsample",
        default=None,
        choices=UPSAMPLING,
        help="how patch scores are upsampled into the map: bicubic (default) outlines small "
        "defects more tightly; scores and decisions are the same either way",
    )
    parser.add_argument(
        "--closing",
        type=int,
        default=None,
        metavar="N",
        help="fill dips in the anomaly map up to N patches wide, so broad defects that light "
        f"up only at their outline are covered (maps and masks only; 1: off; default "
        f"{DEFAULT.closing})",
    )


def zero_shot_options(parser: argparse.ArgumentParser) -> None:
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


def scorer_from(args: argparse.Namespace) -> MutualScorer:
    return MutualScorer(
        neighbourhoods=args.mutual_sizes,
        rescore_neighbours=args.mutual_rescore,
        precision=args.precision,
        sigma=DEFAULT.sigma if args.sigma is None else args.sigma,
    )


def detector_options(parser: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    setting_option(parser)
    backbone_options(parser)
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
    parser.add_argument(
        "--coreset-ratio",
        type=float,
        default=None,
        metavar="R",
        help=f"patchknn: share of each image's patches kept on arrival (default "
        f"{DEFAULT.coreset_ratio:g}; 1 keeps all)",
    )
    parser.add_argument(
        "--max-bank-size",
        type=int,
        default=None,
        metavar="N",
        help=f"patchknn: the most patches the memory bank keeps (default "
        f"{DEFAULT.max_bank_size}); it bounds the search per image",
    )
    map_options(parser)
    if MUTUAL in methods:
        zero_shot_options(parser)


def setting_from(args: argparse.Namespace, method: str | None = None) -> Setting | str:
    """The setting the options name: --setting (where the subcommand has it), changed by every
    setting option given, and by `method` (else --method) where one is named; "auto" where
    it is asked for and no option pins one."""
    changes = {
        field: getattr(args, CLI_NAMES.get(field, field))
        for field in FIELDS
        if getattr(args, CLI_NAMES.get(field, field), None) is not None
    }
    changes.pop("method", None)
    chosen = method or getattr(args, "method", None)
    if chosen is not None:
        changes["method"] = chosen
    return resolve_setting(getattr(args, "setting", AUTO), changes)


def detector_from(args: argparse.Namespace, method: str | None = None, **extra) -> Detector:
    """A detector in the setting the options name (`setting_from`), plus `extra`."""
    return Detector(
        setting_from(args, method),
        weights=args.weights,
        precision=args.precision,
        device=args.device,
        **extra,
    )


def fitted_detector_from(args: argparse.Namespace, method: str | None = None, **extra) -> Detector:
    """An unfitted detector in the options of `detector_options` (fit, eval, demo)."""
    chosen = method or args.method
    if args.low_variance is not None and args.method not in ("gaussian", "all"):
        raise ValueError("--low-variance is an option of --method gaussian")
    if args.low_variance is not None and chosen != "gaussian":  # eval --method all's others
        args = argparse.Namespace(**{**vars(args), "low_variance": None})
    return detector_from(
        args,
        chosen,
        shots=args.shots,
        augment=not args.no_augment,
        scorer=scorer_from(args) if "mutual_sizes" in args else None,
        dense_map=args.dense_map,
        max_ms_per_image=args.max_ms_per_image,
        **extra,
    )
