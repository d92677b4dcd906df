"""Zero-shot scoring on Ray: each sub-batch of the set scored against itself in a task, as
on one machine."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normalcy.data import ImageInput, ImageLoadError
from normalcy.detector import Detector
from normalcy.distributed.cluster import PART_IMAGES, connect, in_order, run_parts
from normalcy.distributed.results import (
    RESULT_GLOB,
    ROWS_PER_FILE,
    PredictSummary,
    ResultWriter,
    outcome_row,
    result_table,
)
from normalcy.inputs import expand_inputs


def _content_keys(params: dict[str, Any], sources: list[str]) -> list[bytes | ImageLoadError]:
    """Each image's content key as zero-shot scoring computes it, or its load error."""
    from normalcy.inputs import load_many
    from normalcy.methods.mutual import content_key

    side = Detector(**params).decode_side
    return [
        item if isinstance(item, ImageLoadError) else content_key(item.image)
        for item in load_many(sources, min_side=side)
    ]


def _zero_shot_part(params: dict[str, Any], sources: list[str]) -> Any:
    """One sub-batch scored against itself, as result rows."""
    outcomes = Detector(**params).zero_shot(sources)
    return result_table([outcome_row(s, o) for s, o in zip(sources, outcomes, strict=True)])


def zero_shot(
    detector: Detector,
    inputs: ImageInput | Sequence[ImageInput],
    out: str | os.PathLike,
    address: str | None = None,
    part_images: int = PART_IMAGES,
    progress: bool = True,
) -> PredictSummary:
    """Zero-shot scoring of a large unlabelled set on Ray, with the results of
    `detector.zero_shot(inputs)`: the set is split into the same sub-batches (by the content
    of the decoded images, see `mutual.sub_batches`) and each is scored against itself in
    its own task. Rows go to `out`/results-*.parquet as sub-batches finish.

    A sub-batch's scores depend on its other images, so a run starts from an empty `out`
    (no resume), and re-scoring across the set (`rescore_neighbours`) is not offered.
    """
    from normalcy.methods.mutual import sub_batches

    scorer = detector.mutual_scorer()
    if detector.active_setting.method != "mutual" or scorer.rescore_neighbours:
        raise ValueError(
            "zero-shot on Ray scores with method mutual and no re-scoring (--mutual-rescore 0):"
            " re-scoring compares image scores across the whole set"
        )
    out = Path(out)
    if list(out.glob(RESULT_GLOB)):
        raise ValueError(
            f"{out} already holds results: zero-shot scores depend on the whole set, so a run "
            "on Ray starts from an empty output folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(source) for source in expand_inputs(inputs)]
    ray = connect(address)
    params = {**detector.get_params(), "progress": False}
    parts = [(params, sources[i : i + part_images]) for i in range(0, len(sources), part_images)]
    start = time.perf_counter()
    keyed = in_order(run_parts(ray, _content_keys, parts, "read", progress))
    keys = [key for part in keyed for key in part]
    readable = [i for i, key in enumerate(keys) if isinstance(key, bytes)]
    failed = [i for i, key in enumerate(keys) if isinstance(key, ImageLoadError)]
    writer = ResultWriter(out, ROWS_PER_FILE)
    if failed:
        writer.add(result_table([outcome_row(sources[i], keys[i]) for i in failed]))
    summary = PredictSummary(unreadable=len(failed))
    groups = sub_batches([keys[i] for i in readable], scorer.max_peers) if readable else []
    batches = [(params, [sources[readable[i]] for i in group]) for group in groups]
    try:
        for _, table in run_parts(ray, _zero_shot_part, batches, "zero-shot on ray", progress):
            writer.add(table)
            summary.count(table)
    finally:
        writer.flush()
        summary.files = writer.files
        summary.seconds = time.perf_counter() - start
    return summary
