"""The `normalcy` command: the library's command line, or, where torch is absent, the service
for exported models alone; anything else names the extra to install."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

TORCH_HINT = (
    "normalcy: the command line needs the library's PyTorch extra: pip install 'normalcy[torch]'"
    " (exported models run without it: `from normalcy import runtime`, with 'normalcy[runtime]',"
    " and `normalcy serve --runtime onnx EXPORTED` with 'normalcy[runtime,serve]')"
)


def main() -> int:
    if importlib.util.find_spec("torch") is not None:
        from normalcy.cli import main as run

        return run()
    if sys.argv[1:2] != ["serve"]:
        print(TORCH_HINT, file=sys.stderr)
        return 2
    return serve_exported(sys.argv[1:])


def serve_exported(argv: list[str]) -> int:
    """`normalcy serve --runtime onnx|openvino ...` without torch."""
    from normalcy.serving import add_serve_command, run_serve

    parser = argparse.ArgumentParser(prog="normalcy")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if args.runtime == "torch":
        print(TORCH_HINT, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return run_serve(args)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        print(f"normalcy: error: {error}", file=sys.stderr)
        return 2
