"""Fitting full-shot patch kNN or Gaussian models on Ray: the backbone passes spread over
tasks; the same model as on one machine."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import Any

from normalcy import fitting
from normalcy.data import ImageInput
from normalcy.detector import Detector
from normalcy.distributed.cluster import PART_IMAGES, connect, in_order, run_parts
from normalcy.fitting import MIN_IMAGES_FOR_HOLDOUT, held_out_split
from normalcy.inputs import expand_inputs
from normalcy.setting import AUTO


def _fit_part(params: dict[str, Any], sources: list[str], first: int) -> dict[str, Any]:
    """A worker's share of a fit: its images' share of a patch-kNN bank (reduced as the
    single-machine fit reduces them, numbered from `first`) or their Gaussian sums, which
    images were readable, and what was skipped."""
    from normalcy.methods.gaussian import FeatureSums

    detector = Detector(**params)
    readable: list[str] = []
    grids = fitting.bank_grids(
        detector, fitting.decoded(detector, sources, "fit", readable=readable), False
    )
    if detector.active_setting.method == "gaussian":
        state: Any = FeatureSums()
        for grid in grids:
            state.add(grid)
    else:
        state = list(fitting.new_method(detector, False).reduce(grids, first))
    return {
        "state": state,
        "readable": readable,
        "skipped": detector.skipped_,
        "input_sizes": detector.input_sizes_,
    }


def fit(
    detector: Detector,
    normal: ImageInput | Sequence[ImageInput],
    address: str | None = None,
    part_images: int = PART_IMAGES,
    progress: bool = True,
) -> Detector:
    """Fit `detector` (full-shot patchknn or gaussian) on Ray, the backbone passes spread
    over tasks of `part_images` images each; the same model as `detector.fit(normal)`.

    Patch kNN: every task reduces its images' patches as the single-machine fit does (each
    image by its own seed), the driver joins them in order and runs the final greedy pass,
    so the bank is the one a single machine builds (exactly, when every image is readable);
    the threshold is then set on the driver from at most 500 of the images, each scored
    against the bank without its own patches, as on one machine. Gaussian: tasks sum the
    moments of their images (all but every 10th), the driver adds the sums (the same
    statistics) and the held-out images are scored in tasks too. With setting "auto", the
    setting is chosen first, here on the driver, from a subsample (`Detector.select_setting`).
    """
    sources = [str(source) for source in expand_inputs(normal)]
    if detector.setting == AUTO:  # chosen here, on a subsample; then fitted on Ray
        detector.select_setting(sources)
    method = detector.active_setting.method
    if method not in ("patchknn", "gaussian") or detector.shots is not None:
        raise ValueError(
            f"a fit on Ray builds full-shot patchknn or gaussian models, not {method!r}"
            + (f" with {detector.shots} shots" if detector.shots is not None else "")
        )
    if len(sources) < MIN_IMAGES_FOR_HOLDOUT:
        raise ValueError(
            f"a fit on Ray needs at least {MIN_IMAGES_FOR_HOLDOUT} images, got {len(sources)}"
        )
    ray = connect(address)
    params = {**detector.get_params(), "setting": detector.active_setting, "progress": False}
    bank, held = held_out_split(sources) if method == "gaussian" else (sources, [])
    parts = [
        (params, bank[start : start + part_images], start)
        for start in range(0, len(bank), part_images)
    ]
    results = in_order(run_parts(ray, _fit_part, parts, "fit on ray", progress))
    detector.skipped_ = [line for result in results for line in result["skipped"]]
    detector.input_sizes_ = sum((r["input_sizes"] for r in results), Counter())
    readable = [source for result in results for source in result["readable"]]
    if not readable:
        raise fitting.unreadable_error(detector)
    detector.method_ = fitting.new_method(detector, False)
    if method == "gaussian":
        from normalcy.methods.gaussian import FeatureSums

        sums = FeatureSums()
        for result in results:
            sums.merge(result["state"])
        detector.method_.fit_sums(sums)
        shipped = copy.copy(detector)
        shipped.backbone_ = None  # each worker makes its own
        shipped_ref = ray.put(shipped)
        held_parts = [
            (shipped_ref, held[start : start + part_images])
            for start in range(0, len(held), part_images)
        ]
        scored = in_order(
            run_parts(ray, fitting.held_out_results, held_parts, "hold-out", progress)
        )
        normal_results = [row for rows, _ in scored for row in rows]
        dense_peaks = [peak for _, peaks in scored for peak in peaks]
        scheme = "every 10th held out of the bank"
    else:
        detector.method_.fit_reduced(pair for result in results for pair in result["state"])
        normal_results, dense_peaks = fitting.left_out_results(detector, readable)
        scheme = "each scored against the bank without its own patches"
    return fitting.finish(detector, len(sources), normal_results, dense_peaks, scheme)
