"""Benchmark runner over MVTec-layout datasets: fit on train/good, score test, compute metrics."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normalcy.data import (
    ImageLoadError,
    MVTecCategory,
    TestSample,
    few_shot_references,
    find_categories,
    load_many,
    load_mask,
)
from normalcy.detector import Detector, Prediction
from normalcy.metrics import aupro, f1_max, image_auroc, pixel_auroc

METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "fit_seconds",
    "predict_ms_per_image",
    "peak_rss_mb",
)


@dataclass
class CategoryResult:
    category: str
    method: str
    backbone: str
    shots: int | None
    image_auroc: float
    pixel_auroc: float | None
    aupro: float | None
    image_f1_max: float
    fit_seconds: float
    predict_ms_per_image: float
    peak_rss_mb: float
    n_train: int
    n_test: int


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# Called with each test sample, its decoded image and its prediction (for reports).
SampleHook = Callable[[TestSample, np.ndarray, Prediction], None]


def evaluate_category(
    category: MVTecCategory,
    detector: Detector,
    seed: int = 0,
    on_sample: SampleHook | None = None,
) -> CategoryResult:
    """Fit `detector` on the category's normal training images and measure it on its test set."""
    train = category.train
    if detector.shots is not None:
        train = few_shot_references(train, detector.shots, seed)
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start

    samples: list[TestSample] = []
    labels: list[int] = []
    scores: list[float] = []
    masks: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    predict_seconds = 0.0
    loaded = load_many([s.path for s in category.test])
    start = time.perf_counter()
    for sample, item in zip(category.test, loaded, strict=True):
        if isinstance(item, ImageLoadError):
            print(f"warning: skipped test image {item}", file=sys.stderr)
            continue
        prediction = next(detector.predict_images([item]))
        predict_seconds += time.perf_counter() - start
        samples.append(sample)
        labels.append(sample.label)
        scores.append(prediction.score)
        if category.has_masks:
            shape = item.image.shape[:2]
            masks.append(
                load_mask(sample.mask_path, shape)
                if sample.mask_path is not None
                else np.zeros(shape, dtype=bool)
            )
            maps.append(prediction.anomaly_map)
        if on_sample is not None:
            on_sample(sample, item.image, prediction)
        start = time.perf_counter()

    pixel = region = None
    if category.has_masks and any(m.any() for m in masks):
        pixel = pixel_auroc(masks, maps)
        region = aupro(masks, maps)
    return CategoryResult(
        category=category.name,
        method=detector.method,
        backbone=detector.backbone,
        shots=detector.shots,
        image_auroc=image_auroc(labels, scores),
        pixel_auroc=pixel,
        aupro=region,
        image_f1_max=f1_max(labels, scores),
        fit_seconds=fit_seconds,
        predict_ms_per_image=1000 * predict_seconds / max(1, len(samples)),
        peak_rss_mb=peak_rss_mb(),
        n_train=detector.n_train_,
        n_test=len(samples),
    )


def summarize(results: Sequence[CategoryResult]) -> dict[str, Any]:
    """The eval JSON: per-category rows and their mean over categories."""
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [getattr(r, key) for r in results if getattr(r, key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    return {"results": [asdict(r) for r in results], "mean": mean}


def evaluate(
    root: str | Path,
    categories: Sequence[str] | None = None,
    make_detector: Callable[[], Detector] = Detector,
    seed: int = 0,
    on_sample: Callable[[str], SampleHook | None] | None = None,
) -> dict[str, Any]:
    """Evaluate a fresh detector on each category of an MVTec-layout dataset."""
    results = []
    for category in find_categories(root, categories):
        hook = on_sample(category.name) if on_sample else None
        results.append(evaluate_category(category, make_detector(), seed, hook))
    return summarize(results)


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of an eval summary."""
    columns = ["category", "method", "backbone", "shots", *METRIC_KEYS]
    rows = [[_cell(row.get(c)) for c in columns] for row in summary["results"]]
    if len(rows) > 1:
        rows.append(["mean", "", "", ""] + [_cell(summary["mean"][k]) for k in METRIC_KEYS])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)
