"""Tests for normalcy.export and normalcy.runtime: exported models score like the library."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close

from normalcy import Detector, runtime
from normalcy.cli import main
from normalcy.export import export_model
from normalcy.methods.base import NotExportable

pytest.importorskip("onnxruntime", reason="the runtime extra (onnxruntime) is not installed")

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
ENGINES = ("onnxruntime", "openvino") if HAS_OPENVINO else ("onnxruntime",)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = {"backbone": "efficientnet_lite0", "image_size": 64}

# (method, shots): patch kNN full- and few-shot, the Gaussian, both fused, golden templates.
SETTINGS = [("patchknn", None), ("patchknn", 2), ("gaussian", None), ("patchknn+gaussian", None)]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if "ground_truth" not in p.parts)


def assert_same_predictions(exported: runtime.ExportedModel, library: Detector, images) -> None:
    """Scores within float32's tolerance (`assert_close`, at the scale of all the scores, so
    an image scored against itself, 0, is compared absolutely), identical decisions, maps
    within 1e-3 of the largest map range (the runtime resizes with its own filter; a map of an
    image against itself is flat at about 0)."""
    pairs = list(zip(exported.predict(images), library.predict(images), strict=True))
    scale = max(abs(theirs.score) for _, theirs in pairs)
    span = max(float(np.ptp(theirs.anomaly_map)) for _, theirs in pairs)
    for ours, theirs in pairs:
        assert ours.name == theirs.name and ours.image_size == theirs.image_size
        assert_close(ours.score, theirs.score, scale=scale)
        assert ours.is_anomalous == theirs.is_anomalous
        assert np.abs(ours.anomaly_map - theirs.anomaly_map).max() <= 1e-3 * span
        if theirs.mask is not None:  # pixels on the threshold itself may fall either way
            assert (ours.mask != theirs.mask).mean() < 1e-3


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda s: f"{s[0]}-{s[1] or 'full'}shot")
def fitted(request, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    method, shots = request.param
    detector = Detector(method=method, shots=shots, **FAST).fit(dataset / "train" / "good")
    return detector.save(tmp_path_factory.mktemp("models") / method)


def test_an_exported_model_scores_as_the_library_does(
    fitted: Path, dataset: Path, tmp_path: Path
) -> None:
    folder = export_model(fitted, tmp_path / "exported")
    library = Detector.load(fitted, precision="float32")
    for engine in ENGINES:
        exported = runtime.load(folder, engine)
        assert exported.threshold == library.threshold_  # stored in export.json as JSON text
        assert_same_predictions(exported, library, _images(dataset / "test"))


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_openvinos_own_format_scores_as_the_library_does(model: Path, dataset, tmp_path) -> None:
    folder = export_model(model, tmp_path / "exported", format="openvino")
    assert {p.name for p in folder.iterdir()} == {"model.xml", "model.bin", "export.json"}
    exported = runtime.load(folder)
    assert exported.engine == "openvino"
    library = Detector.load(model, precision="float32")
    assert_same_predictions(exported, library, _images(dataset / "test"))


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_openvino_in_bfloat16_scores_close_to_float32(model: Path, dataset, tmp_path) -> None:
    folder = export_model(model, tmp_path / "exported")
    exported = runtime.load(folder, "openvino", precision="bfloat16")
    assert exported.describe()["precision"] == "bfloat16"
    images = _images(dataset / "test")
    library = Detector.load(model, precision="float32").predict(images)
    ours = exported.predict(images)
    scores = np.array([p.score for p in ours])
    np.testing.assert_allclose(scores, [p.score for p in library], rtol=0.03)
    assert np.corrcoef(scores, [p.score for p in library])[0, 1] > 0.99


def test_a_precision_an_engine_lacks_is_refused(model: Path, tmp_path: Path) -> None:
    folder = export_model(model, tmp_path / "exported")
    with pytest.raises(ValueError, match="not available on onnxruntime"):
        runtime.load(folder, "onnxruntime", precision="bfloat16")


def test_the_runtimes_resize_is_the_librarys(dataset: Path) -> None:
    import torch

    from normalcy.backbones import network_input

    rng = np.random.default_rng(5)
    for shape, size in (
        ((640, 480), (224, 168)),
        ((300, 1000), (224, 742)),
        ((90, 100), (224, 252)),
    ):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        library = network_input(torch.from_numpy(image), size).permute(1, 2, 0).numpy() * 255
        np.testing.assert_allclose(runtime.resize_pixels(image, size), library, atol=0.02)


def test_golden_templates_export_with_their_references(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    changed = reference.copy()
    changed[20:28, 30:38] = 255 - changed[20:28, 30:38]
    detector = Detector(method="golden", threshold=1.0, **FAST).fit([reference])
    folder = export_model(detector.save(tmp_path / "m"), tmp_path / "e")
    library = Detector.load(tmp_path / "m", precision="float32")
    for engine in ENGINES:
        exported = runtime.load(folder, engine)
        assert_same_predictions(exported, library, [reference, changed])
        assert exported.predict(changed).score > exported.predict(reference).score


def test_the_default_size_is_the_input_size_of_most_training_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    model = Detector(threshold=1.0, **FAST).fit(images).save(tmp_path / "m")
    exported = export_model(model, tmp_path / "e")
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["input"]["network_size"] == [64, 96]
    other = export_model(model, tmp_path / "e2", size=(96, 64))
    assert runtime.load(other).network_size == (96, 64)


def test_the_runtime_imports_no_torch(model: Path, dataset: Path, tmp_path: Path) -> None:
    exported = export_model(model, tmp_path / "exported")
    image = _images(dataset / "test")[0]
    script = (
        "import sys\n"
        "from normalcy import runtime\n"
        f"p = runtime.load({str(exported)!r}).predict({str(image)!r})\n"
        "assert p.anomaly_map.shape == p.image_size\n"
        "print(p.score, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    score, torch_modules = done.stdout.split(" ", 1)
    assert torch_modules.strip() == "[]"
    assert_close(float(score), Detector.load(model, precision="float32").predict(image).score)


def test_a_corrupted_or_mismatched_export_is_refused_naming_the_file(
    model: Path, tmp_path: Path
) -> None:
    exported = export_model(model, tmp_path / "exported")
    graph, manifest_file = exported / "model.onnx", exported / "export.json"
    manifest = json.loads(manifest_file.read_text())
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(runtime.ExportFileError, match=r"model\.onnx.*checksum"):
        runtime.load(exported)
    graph.write_bytes(b"not a graph")  # its checksum recorded: a broken graph, not a mismatch
    manifest["sha256"]["model.onnx"] = hashlib.sha256(b"not a graph").hexdigest()
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(runtime.ExportFileError, match=r"model\.onnx: not a usable graph"):
        runtime.load(exported)
    manifest_file.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(runtime.ExportFileError, match=r"export\.json: export format version 99"):
        runtime.load(exported)
    del manifest["input"]["network_size"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(runtime.ExportFileError, match=r"export\.json: 'input.network_size'"):
        runtime.load(exported)
    manifest_file.write_text("{not json")
    with pytest.raises(runtime.ExportFileError, match=r"export\.json: unreadable"):
        runtime.load(exported)
    with pytest.raises(runtime.ExportFileError, match="not found"):
        runtime.load(tmp_path)


def test_zero_shot_scoring_is_refused_with_the_reason() -> None:
    from normalcy.methods.mutual import MutualScorer

    with pytest.raises(NotExportable, match="depends on the batch"):
        MutualScorer().export_module()


def test_a_tiled_model_exports_at_the_size_its_images_are_tiled_at(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (96, 120, 3), dtype=np.uint8) for _ in range(4)]
    model = Detector(tile_scale=1.5, threshold=1.0, **FAST).fit(images[:2]).save(tmp_path / "t")
    folder = export_model(model, tmp_path / "e")
    library = Detector.load(model, precision="float32")
    size = json.loads((folder / "export.json").read_text())["input"]["network_size"]
    assert (
        tuple(size)
        == library.backbone_.network_size(96, 120)
        != library.backbone_.input_size(96, 120)
    )
    for engine in ENGINES:
        assert_same_predictions(runtime.load(folder, engine), library, images[2:])


def test_export_command_writes_the_graph_and_explains_a_bad_size(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    assert main(["export", str(model), "-o", str(out), "--image-size", "64", "96"]) == 0
    assert "64 x 96 px" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"model.onnx", "export.json"}
    assert main(["export", str(model), "-o", str(out), "--image-size", "60", "64"]) == 2
    assert "multiple of the efficientnet_lite0 stride" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("name", ["mtd/magnetic_tile", "deeppcb/pcb"])
def test_exported_models_score_real_images_as_the_library_does(name: str, tmp_path) -> None:
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the dev data sets live in ../shared/data)")
    train = sorted((root / "train" / "good").glob("*"))[::40]
    detector = Detector("default").fit(train)  # DINOv2 ViT-S/14 at 224 px, patch kNN
    model = detector.save(tmp_path / "model")
    # Exported at the commonest network input size of the test images, checked on those.
    by_size: dict[tuple[int, int], list[Path]] = {}
    for path in _images(root / "test"):
        by_size.setdefault(detector.backbone_.input_size(*_size(path)), []).append(path)
    size, same_shape = max(by_size.items(), key=lambda item: len(item[1]))
    same_shape = same_shape[:: max(1, len(same_shape) // 20)]
    assert len(same_shape) >= 20
    folder = export_model(model, tmp_path / "exported", size=size)
    library = Detector.load(model, precision="float32")
    for engine in ENGINES:
        assert_same_predictions(runtime.load(folder, engine), library, same_shape)


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def test_the_command_names_the_extra_to_install_when_torch_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from normalcy import launcher

    real = importlib.util.find_spec
    monkeypatch.setattr(
        launcher.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name)
    )
    assert launcher.main() == 2
    assert "pip install 'normalcy[torch]'" in capsys.readouterr().err
