"""Results of a job on Ray: rows of Parquet files written atomically as the job goes, and
which inputs a complete file already holds (so a rerun resumes)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normalcy.data import ImageLoadError

RESULT_GLOB = "results-*.parquet"
ROWS_PER_FILE = 1000  # the driver writes a results file at least every this many rows ...
FLUSH_SECONDS = 30.0  # ... or this often, whichever comes first
MAP_KEYS = ("map", "mask", "overlay")
COLUMNS = ("name", "score", "is_anomalous", "threshold", "error", *MAP_KEYS)


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
