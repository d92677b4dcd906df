"""Benchmark runner over MVTec-layout datasets: fit on train/good, score test, compute metrics."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normalcy.calibration import achieved_rates
from normalcy.data import ImageLoadError, load_image
from normalcy.datasets import (
    MVTecCategory,
    TestSample,
    few_shot_references,
    find_categories,
    load_mask,
)
from normalcy.detector import MUTUAL, Detector, Prediction
from normalcy.inputs import load_many
from normalcy.metrics import aupro, f1_max, image_auroc, pixel_auroc
from normalcy.setting import describe

METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "achieved_fpr",
    "recall",
    "fit_seconds",
    "predict_ms_per_image",
    "peak_rss_mb",
)


@dataclass
class DefectResult:
    """One defect type against the good test images: which defects a setting misses."""

    defect: str
    n_images: int
    image_auroc: float
    aupro: float | None


@dataclass
class CategoryResult:
    category: str
    method: str
    backbone: str
    shots: int | None
    draw: int | None  # few-shot reference draw (seed); None otherwise
    image_auroc: float
    pixel_auroc: float | None
    aupro: float | None
    image_f1_max: float
    # The stored threshold's decisions on the test set: the share of good images flagged
    # (against the fpr asked for at fit) and of defective images flagged.
    threshold: float | None
    achieved_fpr: float | None
    recall: float | None
    fit_seconds: float
    predict_ms_per_image: float
    peak_rss_mb: float
    n_train: int
    n_test: int
    by_defect: list[DefectResult] = field(default_factory=list)
    # The setting fitted (its name, or the options that give it) and, where `auto` chose
    # it, the choice (`Selection.to_json`).
    setting: str = "default"
    selection: dict[str, Any] | None = None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# Called with each test sample, its decoded image and its prediction (for reports).
SampleHook = Callable[[TestSample, np.ndarray, Prediction], None]


Scored = list[tuple[TestSample, Prediction]]


def _scored_by_fitting(
    category: MVTecCategory, detector: Detector, seed: int, on_sample: SampleHook | None
) -> tuple[float, float, Scored]:
    """Fit on the category's normal images, then predict each test image: fit seconds,
    predict seconds and (sample, prediction) for every readable test image."""
    train = category.train
    if detector.shots is not None:
        train = few_shot_references(train, detector.shots, seed)
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    scored = []
    predict_seconds = 0.0
    # Decoded as predict decodes them (reduced where the file is much larger than the
    # backbone input), and timed with the prediction; maps are drawn at each image's
    # original size for the pixel metrics.
    decoded = load_many([s.path for s in category.test], min_side=detector.decode_side)
    for sample in category.test:
        start = time.perf_counter()
        item = next(decoded)
        if isinstance(item, ImageLoadError):
            print(f"warning: skipped test image {item}", file=sys.stderr)
            continue
        prediction = next(detector.predict_images([item]))
        predict_seconds += time.perf_counter() - start
        scored.append((sample, prediction))
        if on_sample is not None:
            on_sample(sample, item.image, prediction)
    return fit_seconds, predict_seconds, scored


def _scored_zero_shot(
    category: MVTecCategory, detector: Detector, on_sample: SampleHook | None
) -> tuple[float, float, Scored]:
    """The whole test set scored as one unlabelled batch; nothing is fitted."""
    start = time.perf_counter()
    outcomes = detector.zero_shot([s.path for s in category.test])
    predict_seconds = time.perf_counter() - start
    scored = []
    for sample, outcome in zip(category.test, outcomes, strict=True):
        if isinstance(outcome, ImageLoadError):
            print(f"warning: skipped test image {outcome}", file=sys.stderr)
        else:
            scored.append((sample, outcome))
            if on_sample is not None:
                on_sample(sample, load_image(sample.path, min_side=detector.decode_side), outcome)
    return 0.0, predict_seconds, scored


def evaluate_category(
    category: MVTecCategory,
    detector: Detector,
    seed: int = 0,
    on_sample: SampleHook | None = None,
) -> CategoryResult:
    """Fit `detector` on the category's normal training images (zero-shot: nothing) and
    measure it on its test set."""
    if detector.active_setting.method == MUTUAL:
        fit_seconds, predict_seconds, scored = _scored_zero_shot(category, detector, on_sample)
    else:
        fit_seconds, predict_seconds, scored = _scored_by_fitting(
            category, detector, seed, on_sample
        )
    labels = [sample.label for sample, _ in scored]
    scores = [prediction.score for _, prediction in scored]
    threshold = getattr(detector, "threshold_", None)
    achieved_fpr, recall = achieved_rates(np.array(labels), np.array(scores), threshold)
    pixel = region = maps = masks = None
    if category.has_masks:
        maps = [prediction.anomaly_map for _, prediction in scored]
        masks = [
            load_mask(sample.mask_path, m.shape)
            if sample.mask_path is not None
            else np.zeros(m.shape, dtype=bool)
            for (sample, _), m in zip(scored, maps, strict=True)
        ]
        if any(m.any() for m in masks):
            pixel = pixel_auroc(masks, maps)
            region = aupro(masks, maps)
    return CategoryResult(
        category=category.name,
        method=detector.active_setting.method,
        backbone=detector.active_setting.backbone,
        shots=detector.shots,
        draw=seed if detector.shots is not None else None,
        image_auroc=image_auroc(labels, scores),
        pixel_auroc=pixel,
        aupro=region,
        image_f1_max=f1_max(labels, scores),
        threshold=threshold,
        achieved_fpr=achieved_fpr,
        recall=recall,
        fit_seconds=fit_seconds,
        predict_ms_per_image=1000 * predict_seconds / max(1, len(scored)),
        peak_rss_mb=peak_rss_mb(),
        n_train=getattr(detector, "n_train_", 0),
        n_test=len(scored),
        by_defect=by_defect([s.defect for s, _ in scored], scores, masks, maps),
        setting=describe(detector.active_setting),
        selection=selection.to_json()
        if (selection := getattr(detector, "selection_", None))
        else None,
    )


def _selection_json(detector: Detector) -> dict[str, Any] | None:
    selection = getattr(detector, "selection_", None)
    return selection.to_json() if selection is not None else None


def by_defect(
    defects: Sequence[str],
    scores: Sequence[float],
    masks: Sequence[np.ndarray] | None = None,
    maps: Sequence[np.ndarray] | None = None,
) -> list[DefectResult]:
    """Each defect type scored against the good images alone (AUPRO on those images' pixels
    when masks are given). Needs good images and at least two defect types to say anything
    the overall row does not."""
    kinds = sorted(set(defects) - {"good"})
    if "good" not in defects or len(kinds) < 2:
        return []
    results = []
    for kind in kinds:
        chosen = [i for i, d in enumerate(defects) if d in ("good", kind)]
        region = None
        if masks is not None and maps is not None:
            kind_masks = [masks[i] for i in chosen]
            if any(m.any() for m in kind_masks):
                region = aupro(kind_masks, [maps[i] for i in chosen])
        results.append(
            DefectResult(
                defect=kind,
                n_images=sum(d == kind for d in defects),
                image_auroc=image_auroc(
                    [defects[i] != "good" for i in chosen], [scores[i] for i in chosen]
                ),
                aupro=region,
            )
        )
    return results


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(values)) if values else None


def summarize(results: Sequence[CategoryResult]) -> dict[str, Any]:
    """The eval JSON: per-category rows, and for each setting (method, backbone, shots) the
    mean over categories and draws, with the spread (standard deviation) over draws.

    `mean` is the single setting's mean; with several settings it is null and `settings`
    holds each one's.
    """
    rows = [asdict(r) for r in results]
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault((row["method"], row["backbone"], row["shots"]), []).append(row)
    groups = []
    for (method, backbone, shots), members in settings.items():
        draws: dict[Any, list[dict[str, Any]]] = {}
        for row in members:
            draws.setdefault(row["draw"], []).append(row)
        spread = None
        if len(draws) > 1:
            spread = {}
            for key in METRIC_KEYS:
                per_draw = [_mean(d, key) for d in draws.values()]
                known = [v for v in per_draw if v is not None]
                spread[key] = float(np.std(known)) if known else None
        groups.append(
            {
                "method": method,
                "backbone": backbone,
                "shots": shots,
                "n_draws": len(draws),
                "mean": {key: _mean(members, key) for key in METRIC_KEYS},
                "spread": spread,
            }
        )
    return {
        "results": rows,
        "mean": groups[0]["mean"] if len(groups) == 1 else None,
        "settings": groups,
    }


def evaluate(
    root: str | Path,
    categories: Sequence[str] | None = None,
    make_detector: Callable[[], Detector] = Detector,
    seeds: Sequence[int] = (0,),
    on_sample: Callable[[str], SampleHook | None] | None = None,
) -> list[CategoryResult]:
    """Evaluate a fresh detector on each category of an MVTec-layout dataset, once per
    few-shot reference draw in `seeds` (full-shot and zero-shot run once)."""
    results = []
    for category in find_categories(root, categories):
        hook = on_sample(category.name) if on_sample else None
        for index, seed in enumerate(seeds):
            detector = make_detector()
            if index and detector.shots is None:
                break
            results.append(evaluate_category(category, detector, seed, hook if not index else None))
    return results


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of an eval summary: one line per result, then per setting its mean
    (and its spread over draws, as +-)."""
    columns = ["category", "method", "backbone", "shots", "draw", *METRIC_KEYS]
    rows = [[_cell(row.get(c)) for c in columns] for row in summary["results"]]
    if len(rows) > 1:
        for group in summary["settings"]:
            setting = [_cell(group[c]) for c in ("method", "backbone", "shots")]
            rows.append(["mean", *setting, ""] + [_cell(group["mean"][k]) for k in METRIC_KEYS])
            if group["spread"]:
                spread = ["+-" + _cell(group["spread"][k]) for k in METRIC_KEYS]
                rows.append(["spread", *setting, f"{group['n_draws']} draws", *spread])
    return "\n".join(_aligned(columns, rows))


def _aligned(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Header and rows as lines, each column padded to its widest cell."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def format_defect_table(summary: dict[str, Any]) -> str:
    """Per defect type, each result's image AUROC and AUPRO against the good images; empty
    when no result has a breakdown."""
    lines = []
    for row in summary["results"]:
        if not row.get("by_defect"):
            continue
        setting = " ".join(
            _cell(row[k]) for k in ("category", "method", "backbone", "shots", "draw")
        )
        lines.append(f"by defect type: {setting}")
        columns = ["defect", "n_images", "image_auroc", "aupro"]
        cells = [[_cell(d[k]) for k in columns] for d in row["by_defect"]]
        lines += ["  " + line for line in _aligned(columns, cells)]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)
