"""The `normalcy` command: fit, predict, export, eval, serve, demo (one module per job)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
from collections.abc import Sequence

import torch

from normalcy import __version__
from normalcy.cli.evaluate import add_demo_command, add_eval_command
from normalcy.cli.fit import add_export_command, add_fit_command
from normalcy.cli.options import fitted_detector_from
from normalcy.cli.predict import EXIT_SOME_SKIPPED, add_predict_command, tsv_field
from normalcy.serving import add_serve_command

__all__ = ["EXIT_SOME_SKIPPED", "build_parser", "fitted_detector_from", "main", "tsv_field"]


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

    for add_command in (
        add_fit_command,
        add_predict_command,
        add_export_command,
        add_eval_command,
        add_serve_command,
        add_demo_command,
    ):
        add_command(sub)
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
