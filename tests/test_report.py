from __future__ import annotations

import base64
import io
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from normalcy.report import ReportImage, write_report
from normalcy.visualize import OUTLINE_COLOUR, heatmap


def _item(name: str, score: float, label: int | None = None, **kw: Any) -> ReportImage:
    """A small random image decided at threshold 0.5, with a map scaled by its score."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    anomaly_map = kw.pop("anomaly_map", rng.random((24, 32)) * score)
    return ReportImage(
        name=name,
        image=image,
        anomaly_map=anomaly_map,
        score=score,
        is_anomalous=score >= 0.5,
        label=label,
        **kw,
    )


def _embedded_images(document: str) -> list[np.ndarray]:
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', document)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(uri)))) for uri in uris]


def _card_names(document: str) -> list[str]:
    return re.findall(r'<div class="name" title="[^"]*">([^<]*)</div>', document)


def test_report_is_self_contained_html_with_embedded_images(tmp_path: Path) -> None:
    images = [_item("a", 0.2, 0), _item("b", 0.9, 1)]
    path = write_report(tmp_path / "report.html", "Run 1", images, threshold=0.5)
    assert path == tmp_path / "report.html"
    document = path.read_text(encoding="utf-8")
    assert document.startswith("<!DOCTYPE html>")
    assert "<script" not in document and "<link" not in document
    assert not re.search(r'(src|href)="(?!data:)', document)  # nothing fetched from outside
    assert (
        len(_embedded_images(document)) == 2 * len(images) + 1
    )  # two per card plus the colour scale
    assert "ANOMALOUS" in document and ">normal<" in document


def test_names_and_title_are_html_escaped(tmp_path: Path) -> None:
    images = [_item('<img src=x onerror="bad">&', 0.7, group="<cat>")]
    document = write_report(tmp_path / "r.html", "<Title>", images, 0.5).read_text()
    assert "<img src=x" not in document and "<cat>" not in document
    assert "&lt;img src=x onerror=&quot;bad&quot;&gt;&amp;" in document
    assert "&lt;Title&gt;" in document


def test_metrics_table_formats_floats_and_missing_values(tmp_path: Path) -> None:
    metrics = [
        {"category": "bottle", "method": "knn", "image_auroc": 0.98765, "aupro": None},
        {"category": "cable", "method": "knn", "image_auroc": np.float32(0.5), "pixel_auroc": 1},
    ]
    document = write_report(tmp_path / "r.html", "t", [], 0.5, metrics=metrics).read_text()
    table = document[document.index("<table>") : document.index("</table>")]
    headers = re.findall(r"<th>([^<]*)</th>", table)
    assert headers == ["category", "method", "image_auroc", "aupro", "pixel_auroc"]
    cells = re.findall(r"<td>([^<]*)</td>", table)
    assert cells == ["bottle", "knn", "0.988", "–", "–", "cable", "knn", "0.500", "–", "1"]


def test_histogram_splits_by_label_and_draws_threshold(tmp_path: Path) -> None:
    images = [_item(f"n{i}", 0.1 * i, 0) for i in range(5)] + [_item("x", 0.9, 1)]
    document = write_report(tmp_path / "r.html", "t", images, threshold=0.45).read_text()
    assert "normal (5)" in document and "anomalous (1)" in document
    assert "threshold 0.450" in document
    assert 'stroke-dasharray="5,3"' in document


def test_unlabelled_report_has_one_histogram_and_no_roc(tmp_path: Path) -> None:
    images = [_item("a", 0.1), _item("b", 0.8)]
    document = write_report(tmp_path / "r.html", "t", images, threshold=0.5).read_text()
    assert "all images (2)" in document
    assert "ROC" not in document and "misclassified" not in document


def test_roc_needs_both_classes(tmp_path: Path) -> None:
    one_class = [_item("a", 0.1, 0), _item("b", 0.8, 0)]
    document = write_report(tmp_path / "r.html", "t", one_class, 0.5).read_text()
    assert "ROC" not in document
    both = [_item("a", 0.1, 0), _item("b", 0.5, 0), _item("c", 0.8, 1), _item("d", 0.3, 1)]
    document = write_report(tmp_path / "r.html", "t", both, 0.5).read_text()
    assert "AUROC 0.750" in document  # 3 of the 4 (anomalous, normal) pairs are ordered right


def test_too_many_images_keeps_extremes_and_misclassified(tmp_path: Path) -> None:
    images = [_item(f"s{i:02d}", i / 10, label=int(i >= 5)) for i in range(10)]
    images[4] = _item("missed", 0.4, label=1)  # a false negative in the middle
    document = write_report(tmp_path / "r.html", "t", images, 0.5, max_images=4).read_text()
    names = _card_names(document)
    assert names[0] == "missed"  # misclassified cards come first
    assert sorted(names) == sorted(["missed", "s09", "s08", "s00"])
    assert "6 of 10 images not shown" in document
    assert "false negative" in document


def test_overlay_colours_are_comparable_across_cards(tmp_path: Path) -> None:
    cold = _item("cold", 0.1, anomaly_map=np.zeros((24, 32)))
    hot = _item("hot", 0.9, anomaly_map=np.ones((24, 32)))
    document = write_report(tmp_path / "r.html", "t", [cold, hot], 0.5).read_text()
    _, hot_image, hot_overlay, cold_image, cold_overlay = _embedded_images(document)
    brightest, darkest = heatmap(np.array([[1.0, 0.0]]), 0.0, 1.0)[0].astype(float)
    expected_hot = (hot_image.astype(float) + brightest) / 2
    expected_cold = (cold_image.astype(float) + darkest) / 2
    # Thumbnails are JPEG: compare mean colours, which lossy coding keeps.
    assert np.abs(hot_overlay.mean((0, 1)) - expected_hot.mean((0, 1))).max() <= 4
    assert np.abs(cold_overlay.mean((0, 1)) - expected_cold.mean((0, 1))).max() <= 4


def test_predicted_mask_is_outlined_on_the_overlay(tmp_path: Path) -> None:
    mask = np.zeros((24, 32), dtype=bool)
    mask[6:18, 8:24] = True
    item = _item("masked", 0.9, anomaly_map=np.zeros((24, 32)), mask=mask)
    document = write_report(tmp_path / "r.html", "t", [item], 0.5).read_text()
    overlay_pixels = _embedded_images(document)[2].astype(int)
    # JPEG blurs edges a little: "outline" means close to the outline colour.
    outline = np.abs(overlay_pixels - OUTLINE_COLOUR.astype(int)).max(axis=2) < 80
    assert outline[6, 10:22].mean() > 0.8 and not outline[12, 16]
    assert outline[~mask].mean() < 0.05


def test_large_images_are_shown_as_thumbnails(tmp_path: Path) -> None:
    item = ReportImage("big", np.zeros((300, 600, 3), np.uint8), np.zeros((300, 600)), 0.1, False)
    document = write_report(tmp_path / "r.html", "t", [item], 0.5).read_text()
    assert [p.shape for p in _embedded_images(document)[1:]] == [(128, 256, 3), (128, 256, 3)]


def test_report_is_replaced_atomically_without_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(path, "first", [_item("a", 0.1)], 0.5)
    write_report(path, "second", [_item("a", 0.1)], 0.5)
    assert "<title>second</title>" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_map_of_other_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="does not match"):
        ReportImage("x", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5)), 0.0, False)
