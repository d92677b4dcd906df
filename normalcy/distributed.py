"""normalcy on Ray: fit from shards, and score at any scale with actors that each load the
model once, results streamed to Parquet files as the job goes, resumable after a crash.

    normalcy fit NORMAL_DIR -o MODEL --ray [ADDRESS]
    normalcy predict MODEL INPUT... -o OUT --ray [ADDRESS]

Ray Data spreads the image paths over a pool of actors (one per GPU when the cluster has
GPUs, else CPU actors), each holding one `Detector`. The driver only keeps paths and writes
each finished share of rows to `OUT/results-<run>-<n>.parquet` atomically, so an image counts
as done once its row is in a complete file; a rerun with the same OUT skips those. Actors
that die are restarted and their batches retried by Ray. Inputs must be paths every worker
can read (a shared filesystem), and `--maps` files are written by the actors under OUT/maps.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normalcy.data import ImageInput, ImageLoadError, expand_inputs
from normalcy.detector import MIN_IMAGES_FOR_HOLDOUT, Detector, held_out_split

log = logging.getLogger(__name__)

RAY_MISSING = "running on Ray needs the ray extra: pip install 'normalcy[ray]'"
RESULT_GLOB = "results-*.parquet"
ROWS_PER_FILE = 1000  # the driver writes a results file at least every this many rows ...
FLUSH_SECONDS = 30.0  # ... or this often, whichever comes first
MAP_KEYS = ("map", "mask", "overlay")
MAX_BLOCKS = 10_000  # blocks of paths a predict job is cut into, at most
PART_IMAGES = 64  # images per fit task: enough to amortise a task's start, small enough to spread
COLUMNS = ("name", "score", "is_anomalous", "threshold", "error", *MAP_KEYS)


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


def done_names(out: str | os.PathLike) -> set[str]:
    """Names of the inputs that the complete results files in `out` hold."""
    import pyarrow.parquet as pq

    names: set[str] = set()
    for path in sorted(Path(out).glob(RESULT_GLOB)):
        names.update(pq.read_table(path, columns=["name"]).column("name").to_pylist())
    return names


def read_results(out: str | os.PathLike) -> Any:
    """Every row of the results files in `out`, as one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(Path(out).glob(RESULT_GLOB))
    if not paths:
        return result_table([])
    return pa.concat_tables([pq.read_table(path) for path in paths])


def map_stem(name: str) -> str:
    """A file stem for an input's maps, unique across folders and stable across reruns."""
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{Path(name).stem or 'image'}-{digest}"


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


def outcome_row(name: str, outcome: Any) -> dict[str, Any]:
    """The result row of a prediction, or of an `ImageLoadError` (its reason)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    if isinstance(outcome, ImageLoadError):
        row["error"] = outcome.reason
    else:
        row.update(outcome.to_json())
    row["name"] = name
    return row


@dataclass
class PredictSummary:
    """What a distributed predict did: images scored and unreadable in this run, inputs
    skipped as already done by an earlier run, and the results files it wrote."""

    scored: int = 0
    unreadable: int = 0
    already_done: int = 0
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    def count(self, table: Any) -> None:
        """Count a table of result rows in."""
        failed = table.num_rows - table.column("error").null_count
        self.unreadable += failed
        self.scored += table.num_rows - failed

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.unreadable) / self.seconds if self.seconds else 0.0


def result_table(rows: list[dict[str, Any]]) -> Any:
    """Result rows as a pyarrow Table of the results files' schema."""
    import pyarrow as pa

    types = {"score": pa.float64(), "is_anomalous": pa.bool_(), "threshold": pa.float64()}
    return pa.table(
        {name: pa.array([r[name] for r in rows], types.get(name, pa.string())) for name in COLUMNS}
    )


class ResultWriter:
    """Result tables gathered on the driver and written as numbered Parquet files, each
    atomically (a temporary name, then a rename), so a file is either complete or absent."""

    def __init__(
        self, out: Path, rows_per_file: int, on_file: Callable[[Path], None] | None = None
    ) -> None:
        self.out = out
        self.rows_per_file = rows_per_file
        self.on_file = on_file
        self.run = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.tables: list[Any] = []
        self.rows = 0
        self.files: list[Path] = []
        self.written_at = time.monotonic()

    def add(self, table: Any) -> None:
        self.tables.append(table)
        self.rows += table.num_rows
        if self.rows >= self.rows_per_file or time.monotonic() - self.written_at > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.written_at = time.monotonic()
        if not self.rows:
            return
        target = self.out / f"results-{self.run}-{len(self.files):05d}.parquet"
        partial = self.out / f".{target.name}.tmp"
        pq.write_table(pa.concat_tables(self.tables), partial)
        os.replace(partial, target)
        self.files.append(target)
        self.tables, self.rows = [], 0
        if self.on_file is not None:
            self.on_file(target)


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


def _fit_part(params: dict[str, Any], sources: list[str], first: int) -> dict[str, Any]:
    """A worker's share of a fit: its images' share of a patch-kNN bank (reduced as the
    single-machine fit reduces them, numbered from `first`) or their Gaussian sums, which
    images were readable, and what was skipped."""
    from normalcy.methods.gaussian import FeatureSums

    detector = Detector(**params)
    readable: list[str] = []
    grids = detector._bank_grids(detector._loaded(sources, "fit", readable=readable), False)
    if params["method"] == "gaussian":
        state: Any = FeatureSums()
        for grid in grids:
            state.add(grid)
    else:
        state = list(detector._new_method(False).reduce(grids, first))
    return {
        "state": state,
        "readable": readable,
        "skipped": detector.skipped_,
        "input_sizes": detector.input_sizes_,
    }


def _held_out_part(detector: Detector, sources: list[str]) -> tuple[list, list[float]]:
    """Image scores and map peaks (and dense-map peaks) of held-out normal images."""
    method = detector.method_
    scores = method.score_held_out(detector._grids(detector._loaded(sources, "hold-out", False)))
    normal = detector._normal_results(method, scores)
    dense = detector._dense_peaks(method, detector._loaded(sources, "dense maps", False))
    return normal, dense


def _run_parts(ray: Any, function: Any, parts: list[tuple], what: str, progress: bool) -> Any:
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


def _in_order(finished: Any) -> list:
    return [result for _, result in sorted(finished, key=lambda pair: pair[0])]


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
    statistics) and the held-out images are scored in tasks too.
    """
    method = detector.method
    if method not in ("patchknn", "gaussian") or detector.shots is not None:
        raise ValueError(
            f"a fit on Ray builds full-shot patchknn or gaussian models, not {method!r}"
            + (f" with {detector.shots} shots" if detector.shots is not None else "")
        )
    sources = [str(source) for source in expand_inputs(normal)]
    if len(sources) < MIN_IMAGES_FOR_HOLDOUT:
        raise ValueError(
            f"a fit on Ray needs at least {MIN_IMAGES_FOR_HOLDOUT} images, got {len(sources)}"
        )
    ray = connect(address)
    params = {**detector.get_params(), "progress": False}
    bank, held = held_out_split(sources) if method == "gaussian" else (sources, [])
    parts = [
        (params, bank[start : start + part_images], start)
        for start in range(0, len(bank), part_images)
    ]
    results = _in_order(_run_parts(ray, _fit_part, parts, "fit on ray", progress))
    detector.skipped_ = [line for result in results for line in result["skipped"]]
    detector.input_sizes_ = sum((r["input_sizes"] for r in results), Counter())
    readable = [source for result in results for source in result["readable"]]
    if not readable:
        raise detector._unreadable_error()
    detector.method_ = detector._new_method(False)
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
        scored = _in_order(_run_parts(ray, _held_out_part, held_parts, "hold-out", progress))
        normal_results = [row for rows, _ in scored for row in rows]
        dense_peaks = [peak for _, peaks in scored for peak in peaks]
        scheme = "every 10th held out of the bank"
    else:
        detector.method_.fit_reduced(pair for result in results for pair in result["state"])
        normal_results, dense_peaks = detector._left_out_results(readable)
        scheme = "each scored against the bank without its own patches"
    return detector._fitted(len(sources), normal_results, dense_peaks, scheme)


def _content_keys(params: dict[str, Any], sources: list[str]) -> list[bytes | str]:
    """Each image's content key as zero-shot scoring computes it, or why it is unreadable."""
    from normalcy.data import load_many
    from normalcy.methods.mutual import content_key

    side = Detector(**params).decode_side
    return [
        item.reason if isinstance(item, ImageLoadError) else content_key(item.image)
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
    if detector.method != "mutual" or scorer.rescore_neighbours:
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
    keyed = _in_order(_run_parts(ray, _content_keys, parts, "read", progress))
    keys = [key for part in keyed for key in part]
    readable = [i for i, key in enumerate(keys) if isinstance(key, bytes)]
    failed = [i for i, key in enumerate(keys) if isinstance(key, str)]
    writer = ResultWriter(out, ROWS_PER_FILE)
    if failed:
        rows = [{**dict.fromkeys(COLUMNS), "name": sources[i], "error": keys[i]} for i in failed]
        writer.add(result_table(rows))
    summary = PredictSummary(unreadable=len(failed))
    groups = sub_batches([keys[i] for i in readable], scorer.max_peers) if readable else []
    batches = [(params, [sources[readable[i]] for i in group]) for group in groups]
    try:
        for _, table in _run_parts(ray, _zero_shot_part, batches, "zero-shot on ray", progress):
            writer.add(table)
            summary.count(table)
    finally:
        writer.flush()
        summary.files = writer.files
        summary.seconds = time.perf_counter() - start
    return summary
