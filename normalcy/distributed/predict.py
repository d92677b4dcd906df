"""Scoring with a saved model on Ray: a pool of actors, each holding the model once."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from normalcy.data import ImageInput, ImageLoadError
from normalcy.detector import Detector
from normalcy.distributed.cluster import connect
from normalcy.distributed.results import (
    ROWS_PER_FILE,
    PredictSummary,
    ResultWriter,
    done_names,
    map_stem,
    outcome_row,
    result_table,
)
from normalcy.inputs import expand_inputs

MAX_BLOCKS = 10_000  # blocks of paths a predict job is cut into, at most


class Scorer:
    """A Ray Data actor: loads the model once from its files' bytes (a dict in the object
    store, passed as a one-element list so Ray does not resolve it), then scores batches of
    paths into result rows (an unreadable image is a row with its reason, never an error)."""

    def __init__(self, model_files: list, out: str, maps: bool, device: str, threads: int) -> None:
        import ray
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self._folder = tempfile.TemporaryDirectory(prefix="normalcy-model-")  # the actor's life
        for name, data in ray.get(model_files[0]).items():
            (Path(self._folder.name) / name).write_bytes(data)
        self.detector = Detector.load(self._folder.name, device=device)
        self.detector.progress = False
        self.maps = Path(out) / "maps"
        if maps:
            self.maps.mkdir(parents=True, exist_ok=True)
        self.write_maps = maps

    def __call__(self, batch: dict[str, Any]) -> Any:
        from normalcy.visualize import write_map_files

        names = [str(name) for name in batch["name"]]
        threshold = self.detector.threshold_
        vmax = 2 * threshold if threshold else None
        rows = []
        for name, outcome in zip(names, self.detector.predict_iter(names), strict=True):
            row = outcome_row(name, outcome)
            if self.write_maps and not isinstance(outcome, ImageLoadError):
                scale = vmax or float(outcome.score_map.max()) or 1.0
                files = write_map_files(self.maps, map_stem(name), outcome, scale)
                row.update({key: f"maps/{file}" for key, file in files.items()})
            rows.append(row)
        return result_table(rows)


def predict(
    model_dir: str | os.PathLike,
    inputs: ImageInput | Sequence[ImageInput],
    out: str | os.PathLike,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int = 16,
    maps: bool = False,
    progress: bool = True,
    rows_per_file: int = ROWS_PER_FILE,
    on_file: Callable[[Path], None] | None = None,
) -> PredictSummary:
    """Score image paths (files or folders) with the model in `model_dir` on Ray, writing
    rows (name, score, is_anomalous, threshold, error, map paths) to `out`/results-*.parquet;
    inputs whose rows are already there are skipped (see the module docstring).

    actors: scoring actors (None: one per GPU of the cluster, else one per 2 CPUs); each CPU
    actor computes with the cluster's CPUs shared out between them. rows_per_file: rows of
    a results file (one is also written every `FLUSH_SECONDS`). on_file: called with each
    results file once it is complete.
    """
    from tqdm import tqdm

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(source) for source in expand_inputs(inputs)]
    done = done_names(out)
    pending = [name for name in dict.fromkeys(sources) if name not in done]
    summary = PredictSummary(already_done=len(sources) - len(pending))
    if not pending:
        return summary
    ray = connect(address)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    actors = actors or (gpus if gpus else max(1, cpus // 2))
    threads = max(1, cpus // actors)
    # In the object store once; the actors hold it by reference, so a restarted actor finds it.
    model_files = ray.put({p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()})
    # A block per batch (up to MAX_BLOCKS), so every actor has work from the start.
    blocks = min(math.ceil(len(pending) / batch_size), MAX_BLOCKS)
    dataset = ray.data.from_items([{"name": name} for name in pending], override_num_blocks=blocks)
    scored = dataset.map_batches(
        Scorer,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "model_files": [model_files],
            "out": str(out.resolve()),
            "maps": maps,
            "device": "cuda" if gpus else "cpu",
            "threads": threads,
        },
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else threads,
    )  # Ray Data's actor pools restart actors that die and rerun their batches by default
    writer = ResultWriter(out, rows_per_file, on_file)
    start = time.perf_counter()
    bar = tqdm(total=len(pending), unit="img", desc="predict on ray", disable=not progress)
    try:
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(table)
            summary.count(table)
            bar.update(table.num_rows)
    finally:
        bar.close()
        writer.flush()
        summary.files = writer.files
        summary.seconds = time.perf_counter() - start
    return summary
