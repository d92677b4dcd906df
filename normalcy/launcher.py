"""The `normalcy` command: says which extra to install when the library's is missing."""

from __future__ import annotations

import importlib.util
import sys

TORCH_HINT = (
    "normalcy: the command line needs the library's PyTorch extra: pip install 'normalcy[torch]'"
    " (exported models run without it: `from normalcy import runtime`, with 'normalcy[runtime]')"
)


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print(TORCH_HINT, file=sys.stderr)
        return 2
    from normalcy.cli import main as run

    return run()
