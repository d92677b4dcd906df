"""Starting or joining a Ray cluster, and running a job's parts as tasks."""

from __future__ import annotations

import logging
from typing import Any

PART_IMAGES = 64  # images per task of a fit or zero-shot job: amortises a start, still spreads
RAY_MISSING = "running on Ray needs the ray extra: pip install 'normalcy[ray]'"


def require_ray() -> Any:
    """The ray module, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is what predict runs on)
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    return ray


def connect(address: str | None = None) -> Any:
    """Ray, initialised: at `address` (None: $RAY_ADDRESS or a cluster running on this
    machine, else a new local instance); an existing connection is kept."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(
            address=address or None,
            log_to_driver=False,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # predict shows its own, in images/s
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def run_parts(ray: Any, function: Any, parts: list[tuple], what: str, progress: bool) -> Any:
    """`function(*part)` for every part as Ray tasks: (part's index, result) pairs as they
    finish."""
    from tqdm import tqdm

    remote = ray.remote(function)
    pending = {remote.remote(*part): i for i, part in enumerate(parts)}
    with tqdm(total=len(parts), desc=what, unit="part", disable=not progress) as bar:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done), ray.get(done)
            bar.update()


def in_order(finished: Any) -> list:
    return [result for _, result in sorted(finished, key=lambda pair: pair[0])]
