"""A single-file HTML report of a detection run that a person can open in any browser.

Everything is inline (CSS, base64 PNG thumbnails, SVG charts), so the file can be mailed or
archived without breaking. It shows metrics, the score distribution against the threshold,
an ROC curve when ground truth is known, and image cards with anomaly overlays.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normalcy.calibration import achieved_rates
from normalcy.metrics import image_auroc, roc_curve
from normalcy.prediction import Prediction, resize_map
from normalcy.visualize import encode_jpeg, heatmap, overlay, thumbnail, write_atomic

THUMBNAIL_SIDE = 256
_HIST_BINS = 30
_NORMAL_COLOUR, _ANOMALOUS_COLOUR, _UNLABELLED_COLOUR = "#2b7bba", "#d7301f", "#777777"


@dataclass
class ReportImage:
    """One scored image: what the report shows on its card.

    `label` is the ground truth (1 anomalous, 0 normal, None unknown); `mask` the predicted
    defect region, drawn as an outline on the overlay.
    """

    name: str
    image: np.ndarray
    anomaly_map: np.ndarray
    score: float
    is_anomalous: bool
    label: int | None = None
    mask: np.ndarray | None = None
    group: str = ""

    def __post_init__(self) -> None:
        if self.anomaly_map.shape != self.image.shape[:2]:
            raise ValueError(
                f"{self.name}: anomaly_map shape {self.anomaly_map.shape} "
                f"does not match image {self.image.shape[:2]}"
            )
        if self.mask is not None and self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"{self.name}: mask shape {self.mask.shape} does not match image")

    @property
    def misclassified(self) -> bool:
        """True when the ground truth is known and disagrees with the decision."""
        return self.label is not None and bool(self.label) != bool(self.is_anomalous)


def report_image(
    prediction: Prediction, image: np.ndarray, label: int | None = None, group: str = ""
) -> ReportImage:
    """A report entry at thumbnail size, so a report over hundreds of images stays small; its
    map is drawn at that size from the prediction's fixed-scale map, never at full size."""
    small = thumbnail(image, THUMBNAIL_SIDE)
    small_map = resize_map(prediction.score_map, small.shape[:2])
    threshold = prediction.pixel_threshold
    return ReportImage(
        name=prediction.name,
        image=small,
        anomaly_map=small_map,
        score=prediction.score,
        is_anomalous=bool(prediction.is_anomalous),
        label=label,
        mask=None if threshold is None else small_map > threshold,
        group=group,
    )


def _format_score(value: float) -> str:
    """Three significant digits without exponent notation: 0.0123, 5.68, 1234."""
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _format_cell(value: object) -> str:
    """Metrics table cell: floats to 3 decimals, missing values (None, NaN) as a dash."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


def _metrics_table(metrics: Sequence[dict]) -> str:
    columns = list(dict.fromkeys(key for row in metrics for key in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_format_cell(row.get(c)))}</td>" for c in columns)
        + "</tr>"
        for row in metrics
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _histogram_svg(images: Sequence[ReportImage], threshold: float) -> str:
    """Overlaid score histograms per ground-truth class, with the threshold as a dashed line."""
    width, height, left, right, top, bottom = 480, 220, 40, 12, 28, 30
    scores = np.array([im.score for im in images], dtype=np.float64)
    low = min(float(scores.min()), threshold) if len(scores) else threshold
    high = max(float(scores.max()), threshold) if len(scores) else threshold
    if high - low <= 0:
        low, high = low - 0.5, high + 0.5
    labels = [im.label for im in images]
    if all(label is None for label in labels):
        series = [("all images", _UNLABELLED_COLOUR, scores)]
    else:
        series = [
            (name, colour, scores[[label == key for label in labels]])
            for key, name, colour in (
                (0, "normal", _NORMAL_COLOUR),
                (1, "anomalous", _ANOMALOUS_COLOUR),
                (None, "unlabelled", _UNLABELLED_COLOUR),
            )
        ]
        series = [s for s in series if len(s[2])]
    edges = np.linspace(low, high, _HIST_BINS + 1)
    counts = [np.histogram(values, bins=edges)[0] for _, _, values in series]
    peak = max((int(c.max()) for c in counts), default=0) or 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(value: float) -> float:
        return left + (value - low) / (high - low) * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram">'
    ]
    bar_w = plot_w / _HIST_BINS
    for (_, colour, _), count in zip(series, counts, strict=True):
        for i, n in enumerate(count):
            if n:
                bar_h = n / peak * plot_h
                parts.append(
                    f'<rect x="{left + i * bar_w:.1f}" y="{top + plot_h - bar_h:.1f}" '
                    f'width="{bar_w:.1f}" height="{bar_h:.1f}" fill="{colour}" '
                    'fill-opacity="0.55"/>'
                )
    base_y = top + plot_h
    tx = x_of(threshold)
    parts += [
        f'<line x1="{left}" y1="{base_y}" x2="{width - right}" y2="{base_y}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base_y}" stroke="#333"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{base_y}" text-anchor="end">0</text>',
        f'<text x="{left}" y="{base_y + 16}">{_format_score(low)}</text>',
        f'<text x="{width - right}" y="{base_y + 16}" text-anchor="end">'
        f"{_format_score(high)}</text>",
        f'<line x1="{tx:.1f}" y1="{top - 6}" x2="{tx:.1f}" y2="{base_y}" stroke="#000" '
        'stroke-width="1.5" stroke-dasharray="5,3"/>',
        f'<text x="{tx:.1f}" y="{base_y + 16}" text-anchor="middle">'
        f"threshold {_format_score(threshold)}</text>",
    ]
    for i, (name, colour, values) in enumerate(series):
        x = left + 8 + i * 130
        parts.append(
            f'<rect x="{x}" y="6" width="10" height="10" fill="{colour}" fill-opacity="0.55"/>'
            f'<text x="{x + 14}" y="15">{name} ({len(values)})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _roc_svg(labelled: Sequence[ReportImage]) -> str:
    """ROC curve of labelled images, with the operating point of their decisions marked."""
    scores = np.array([im.score for im in labelled], dtype=np.float64)
    labels = np.array([im.label for im in labelled], dtype=np.int64)
    fpr, tpr, _ = roc_curve(labels, scores)
    auroc = image_auroc(labels, scores)
    decided = np.array([im.is_anomalous for im in labelled], dtype=bool)
    size, margin = 220, 34
    low, high = margin, size - margin

    def xy(f: float, t: float) -> str:
        return f"{low + f * (high - low):.1f},{high - t * (high - low):.1f}"

    point_x, point_y = xy(decided[labels == 0].mean(), decided[labels == 1].mean()).split(",")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
        f'viewBox="0 0 {size} {size}" role="img" aria-label="ROC curve">'
        f'<text x="{size / 2}" y="18" text-anchor="middle">ROC, AUROC {auroc:.3f}</text>'
        f'<rect x="{low}" y="{low}" width="{high - low}" height="{high - low}" fill="none" '
        'stroke="#333"/>'
        f'<polyline points="{xy(0, 0)} {xy(1, 1)}" fill="none" stroke="#aaa" '
        'stroke-dasharray="4,3"/>'
        f'<polyline points="{" ".join(xy(f, t) for f, t in zip(fpr, tpr, strict=True))}" '
        f'fill="none" stroke="{_ANOMALOUS_COLOUR}" stroke-width="2"/>'
        f'<circle cx="{point_x}" cy="{point_y}" r="4" '
        'fill="#000"><title>operating point at the threshold</title></circle>'
        f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle">false positive rate</text>'
        f'<text x="12" y="{size / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {size / 2})">true positive rate</text>'
        "</svg>"
    )


def _select(images: Sequence[ReportImage], threshold: float, max_images: int) -> list[int]:
    """Indices to show: all misclassified images, then the rest split between the highest
    and the lowest scores. If even the misclassified ones do not fit, those furthest from the
    threshold win.
    """
    if len(images) <= max_images:
        return list(range(len(images)))
    wrong = sorted(
        (i for i, im in enumerate(images) if im.misclassified),
        key=lambda i: abs(images[i].score - threshold),
        reverse=True,
    )[:max_images]
    rest = sorted(
        (i for i, im in enumerate(images) if not im.misclassified), key=lambda i: images[i].score
    )
    free = max_images - len(wrong)
    n_high = (free + 1) // 2
    return wrong + rest[len(rest) - n_high :] + rest[: free - n_high]


def _data_uri(array: np.ndarray) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(array)).decode("ascii")


def _img(array: np.ndarray, alt: str) -> str:
    height, width = array.shape[:2]
    return f'<img src="{_data_uri(array)}" width="{width}" height="{height}" alt="{alt}">'


def _card(item: ReportImage, picture: np.ndarray, blended: np.ndarray) -> str:
    name = html.escape(item.name)
    decision = (
        '<span class="bad">ANOMALOUS</span>'
        if item.is_anomalous
        else '<span class="good">normal</span>'
    )
    lines = [
        f'<div class="name" title="{name}">{name}</div>',
        f'<div class="meta">{html.escape(item.group)}</div>' if item.group else "",
        f"<div>score <b>{_format_score(item.score)}</b> · {decision}</div>",
    ]
    if item.label is not None:
        truth = "anomalous" if item.label else "normal"
        error = ""
        if item.misclassified:
            error = " · <b>false positive</b>" if item.is_anomalous else " · <b>false negative</b>"
        lines.append(f'<div class="meta">label: {truth}{error}</div>')
    css = "card wrong" if item.misclassified else "card"
    pictures = _img(picture, f"{name} image") + _img(blended, f"{name} anomaly overlay")
    return f'<div class="{css}"><div class="pics">{pictures}</div>{"".join(lines)}</div>'


def _cards(images: Sequence[ReportImage]) -> tuple[str, float, float]:
    """Card HTML for the given images and the shared colour range (vmin, vmax) used.

    The range is taken over the displayed maps at thumbnail resolution: the minimum and
    the 99th percentile, so a few extreme pixels do not wash out every other card.
    """
    pictures = [thumbnail(im.image, THUMBNAIL_SIDE) for im in images]
    maps = [thumbnail(im.anomaly_map.astype(np.float32), THUMBNAIL_SIDE) for im in images]
    masks = [
        None
        if im.mask is None
        else thumbnail(im.mask.astype(np.uint8) * 255, THUMBNAIL_SIDE) >= 128
        for im in images
    ]
    if maps:
        values = np.concatenate([m.ravel() for m in maps])
        vmin, vmax = float(np.nanmin(values)), float(np.nanpercentile(values, 99))
    else:
        vmin, vmax = 0.0, 1.0
    cards = "".join(
        _card(im, picture, overlay(picture, heat, vmin, vmax, mask=mask))
        for im, picture, heat, mask in zip(images, pictures, maps, masks, strict=True)
    )
    return cards, vmin, vmax


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
svg{background:#fff;border:1px solid #ddd;font-size:11px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;max-width:520px}
.card.wrong{border:2px solid #d7301f}
.pics{display:flex;gap:4px}
.name{font-weight:600;overflow-wrap:anywhere}.meta{color:#666}
.bad{color:#d7301f;font-weight:700}.good{color:#2e7d32;font-weight:600}
.colourbar{vertical-align:middle;border:1px solid #ccc}
"""


def write_report(
    path: str | os.PathLike[str],
    title: str,
    images: Sequence[ReportImage],
    threshold: float,
    metrics: Sequence[dict] | None = None,
    max_images: int = 200,
    breakdown: Sequence[dict] | None = None,
    choices: Sequence[dict] | None = None,
) -> Path:
    """Write a self-contained HTML report and return its path.

    Sections: metrics table and its breakdown by defect type (when given), how `auto` chose
    the setting (`choices`: one row per candidate, when given), score histogram
    with the threshold, ROC curve (when both classes are labelled) and up to `max_images`
    image cards. The file is replaced atomically, so a browser never sees half a report.
    """
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    shown = _select(images, threshold, max_images)
    # Misclassified images first, then the most anomalous-looking.
    shown.sort(key=lambda i: (not images[i].misclassified, -images[i].score))
    cards, vmin, vmax = _cards([images[i] for i in shown])

    n_flagged = sum(bool(im.is_anomalous) for im in images)
    labelled = [im for im in images if im.label is not None]
    summary = (
        f"{len(images)} images, {n_flagged} flagged anomalous at threshold "
        f"{_format_score(threshold)}."
    )
    if labelled:
        n_wrong = sum(im.misclassified for im in labelled)
        summary += f" {n_wrong} of {len(labelled)} labelled images misclassified."
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{summary}</p>"]
    if metrics:
        body += ["<h2>Metrics</h2>", _metrics_table(metrics)]
    if breakdown:
        body += ["<h2>By defect type</h2>", _metrics_table(breakdown)]
    if choices:
        body += [
            "<h2>How the setting was chosen</h2>",
            "<p>Each candidate fitted on some of the normal images and scored on others, "
            "as they are and with defects planted into them (synthetic, not the test "
            "set's).</p>",
            _metrics_table(choices),
        ]
    charts = [_histogram_svg(images, threshold)]
    if {im.label for im in labelled} >= {0, 1}:
        charts.append(_roc_svg(labelled))
    body += ["<h2>Scores</h2>", f'<div class="charts">{"".join(charts)}</div>']
    if labelled:
        # From each image's own decision: images of several methods or categories each
        # carry their own threshold.
        labels = np.array([im.label for im in labelled])
        flagged = np.array([float(bool(im.is_anomalous)) for im in labelled])
        fpr, recall = achieved_rates(labels, flagged, 0.5)
        rates = [
            f"{name} {value:.1%}"
            for name, value in (("false-positive rate on good images", fpr), ("recall", recall))
            if value is not None
        ]
        body.append(f"<p>At the threshold: {'; '.join(rates)}.</p>")

    colourbar = heatmap(np.tile(np.linspace(vmin, vmax, 200), (12, 1)), vmin, vmax)
    body += [
        "<h2>Images</h2>",
        f"<p>Overlay colours: {_format_score(vmin)} {_img(colourbar, 'colour scale')} "
        f"{_format_score(vmax)} (same scale on every card); cyan outlines: predicted mask.</p>",
    ]
    if len(shown) < len(images):
        body.append(
            f"<p><b>{len(images) - len(shown)} of {len(images)} images not shown</b>; "
            "showing all misclassified ones and the highest and lowest scores.</p>"
        )
    body.append(f'<div class="grid">{cards}</div>')

    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    target = Path(path)
    write_atomic(target, document.encode("utf-8"))
    return target
