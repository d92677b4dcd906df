"""What choosing costs: the fit with `auto` (the choice, then the chosen setting's fit on all
normal images) against the chosen setting's own fit on the same images, in one process.

    python benchmarks/auto_cost.py ../shared/data/mtd/magnetic_tile
    python benchmarks/auto_cost.py ../shared/data/deeppcb/pcb --train-every 10
"""

from __future__ import annotations

import time

from common import subsample_arguments, write_json
from speed import cpu_description

from normalcy import Detector
from normalcy.datasets import find_categories
from normalcy.setting import SETTINGS


def main() -> None:
    args = subsample_arguments(__doc__, "auto-cost.json")
    normal = find_categories(args.data)[0].train[:: args.train_every]
    start = time.perf_counter()
    auto = Detector(progress=True).fit(normal)
    auto_seconds = time.perf_counter() - start
    chosen = auto.selection_.chosen if auto.selection_ else "default"
    start = time.perf_counter()
    Detector(SETTINGS[chosen], progress=True).fit(normal)
    pinned_seconds = time.perf_counter() - start
    result = {
        "data": str(args.data),
        "cpu": cpu_description(),
        "normal_images": len(normal),
        "chosen": chosen,
        "auto_fit_seconds": auto_seconds,
        "chosen_fit_seconds": pinned_seconds,
        "ratio": auto_seconds / pinned_seconds,
        "selection": auto.selection_.to_json() if auto.selection_ else None,
    }
    print(
        f"{len(normal)} normal images: auto chose {chosen}; fit {auto_seconds:.0f} s with auto, "
        f"{pinned_seconds:.0f} s pinned to {chosen} ({result['ratio']:.2f}x)"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
