"""Run exported models without torch: numpy, Pillow and onnxruntime (or OpenVINO).

    from normalcy import runtime
    model = runtime.load("exported/")          # a folder written by `normalcy export`
    prediction = model.predict("board.png")    # the library's `Prediction`: score, decision,
                                               # anomaly_map and mask

Images are decoded by the library's own decoder (`normalcy.data`); resizing, normalisation,
the backbone, the scoring, the image score and the map are in the graph (see
`normalcy.export`), so scores equal the library's. An image is resized to the export's network
size whatever its aspect ratio; the library keeps the aspect ratio, so images of another shape
than the one exported for score differently there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from normalcy.data import (
    ImageInput,
    ImageLoadError,
    LoadedImage,
    decoded_ahead,
    expand_inputs,
)
from normalcy.prediction import Prediction, gathered

EXPORT_FORMAT = "normalcy-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_FILE = "export.json"

log = logging.getLogger("normalcy.runtime")


class ExportFileError(ValueError):
    """An exported model that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked `export.json` of an exported model folder."""
    path = Path(folder) / EXPORT_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportFileError(
            path, "not found: not a folder written by `normalcy export`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFileError(path, f"unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ExportFileError(path, f"not a normalcy export (format is not {EXPORT_FORMAT!r})")
    version = manifest.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise ExportFileError(
            path,
            f"export format version {version!r}; this normalcy reads version "
            f"{EXPORT_FORMAT_VERSION}: export the model again with this version",
        )
    for key, kind in (("graph", str), ("sha256", dict), ("input", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ExportFileError(path, f"{key!r} is missing or not a {kind.__name__}")
    size = manifest["input"].get("network_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ExportFileError(path, "'input.network_size' must be [height, width]")
    return manifest


ENGINES = ("onnxruntime", "openvino")


def resize_pixels(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) pixels -> (h, w, 3) float32 at `size`, by the antialiased bilinear filter of
    the library's resize (torch's `interpolate(..., antialias=True)`, Pillow's BILINEAR), within
    0.01 of 255. For engines whose resize lacks antialiasing (OpenVINO): the image then
    reaches the graph at its network size, where the graph's resize is the identity."""
    height, width, channels = image.shape
    rows = _filter_taps(height, size[0]) @ image.reshape(height, -1).astype(np.float32)
    across = rows.reshape(size[0], width, channels).transpose(1, 0, 2).reshape(width, -1)
    columns = (_filter_taps(width, size[1]) @ across).reshape(size[1], size[0], channels)
    return np.ascontiguousarray(columns.transpose(1, 0, 2))


def _filter_taps(source: int, target: int) -> np.ndarray:
    """(target, source) weights of a triangle filter as wide as one source sample per target
    sample when reducing (one target sample when enlarging), normalised per row."""
    scale = source / target
    support, stretch = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    taps = np.zeros((target, source))
    for row in range(target):
        centre = scale * (row + 0.5)
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), source)
        weights = np.clip(1 - np.abs((np.arange(low, high) - centre + 0.5) * stretch), 0, None)
        taps[row, low:high] = weights / weights.sum()
    return taps.astype(np.float32)


class ExportedModel:
    """An exported model and its engine: `predict` as `Detector.predict`.

    engine: "onnxruntime" or "openvino" (None: onnxruntime for an ONNX graph, openvino for
    OpenVINO's format).
    """

    def __init__(self, folder: str | os.PathLike, engine: str | None = None) -> None:
        self.folder = Path(folder)
        self.manifest_ = read_manifest(folder)
        graph = self.folder / Path(self.manifest_["graph"]).name
        for name, digest in self.manifest_["sha256"].items():
            path = self.folder / Path(name).name
            try:
                data = path.read_bytes()
            except OSError as error:
                raise ExportFileError(path, f"unreadable ({error.strerror or error})") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise ExportFileError(
                    path,
                    f"does not match the checksum in {EXPORT_FILE}: the file is corrupted or "
                    "from another export",
                )
        self.engine = engine or ("openvino" if graph.suffix == ".xml" else "onnxruntime")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "onnxruntime" and graph.suffix != ".onnx":
            raise ValueError(f"{graph} is not an ONNX graph: run it with engine='openvino'")
        self.network_size = tuple(self.manifest_["input"]["network_size"])
        start = _onnxruntime if self.engine == "onnxruntime" else _openvino
        try:
            self._run = start(graph, self.network_size)
        except ImportError:
            raise
        except Exception as error:  # each engine raises its own exception types
            raise ExportFileError(graph, f"not a usable graph ({error})") from None
        self.decode_side: int | None = self.manifest_["input"].get("decode_side")
        self.threshold: float | None = self.manifest_.get("threshold")
        self.pixel_threshold: float | None = self.manifest_.get("pixel_threshold")

    def _scores(self, image: np.ndarray) -> tuple[float, np.ndarray]:
        """The image score and the map at the fixed scale of one decoded image."""
        if self.engine == "openvino":
            pixels = resize_pixels(image, self.network_size)
        else:
            pixels = image.astype(np.float32)
        score, score_map = self._run(pixels)
        return float(score), score_map

    def predict_iter(
        self, inputs: ImageInput | Sequence[ImageInput]
    ) -> Iterator[Prediction | ImageLoadError]:
        """A prediction per input, in order, decoded ahead in threads as the library does;
        unreadable inputs yield their error instead."""
        for item in decoded_ahead(expand_inputs(inputs), self.decode_side):
            if isinstance(item, ImageLoadError):
                yield item
            else:
                yield from self.predict_images([item])

    def predict_images(self, images: Iterable[LoadedImage]) -> Iterator[Prediction]:
        """Predictions for already decoded images (decoded for `decode_side`), in order."""
        for item in images:
            score, score_map = self._scores(item.image)
            yield Prediction(
                name=item.name,
                score=score,
                is_anomalous=None if self.threshold is None else bool(score > self.threshold),
                threshold=self.threshold,
                image_size=tuple(item.size),
                draw_map=partial(np.asarray, score_map),
                pixel_threshold=self.pixel_threshold,
            )

    def describe(self) -> dict[str, Any]:
        """What the service lists about a model."""
        return {
            "backbone": self.manifest_.get("backbone"),
            "method": self.manifest_.get("method"),
            "shots": self.manifest_.get("shots"),
            "threshold": self.threshold,
            "image_size": min(self.network_size),
            "version": self.manifest_.get("normalcy_version"),
            "runtime": self.engine,
        }

    def predict(self, x: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Prediction for one image, or a list for several (a folder, a list, a 4-D array).
        Raises ImageLoadError naming the input when an image cannot be read."""
        return gathered(self.predict_iter(x), x)


def load(folder: str | os.PathLike, engine: str | None = None) -> ExportedModel:
    """The exported model in `folder` (written by `normalcy export`), checked, on `engine`
    (see `ExportedModel`): a missing, corrupted or mismatched file raises `ExportFileError`
    naming it."""
    return ExportedModel(folder, engine)


def _onnxruntime(graph: Path, network_size: tuple[int, int]) -> Callable[[np.ndarray], list]:
    """A session on the graph (it resizes images of any size itself: `network_size` unused)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "running exported models needs onnxruntime: pip install 'normalcy[runtime]'"
        ) from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(
        graph.read_bytes(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {name: pixels})


def _openvino(graph: Path, network_size: tuple[int, int]) -> Callable[[np.ndarray], list]:
    try:
        import openvino
    except ImportError:
        raise ImportError("engine='openvino' needs openvino: pip install openvino") from None
    core = openvino.Core()
    model = core.read_model(graph)
    # Fixed at the network size it is always given (a dynamic shape runs several times
    # slower); float32 throughout (OpenVINO's default on CPUs with bfloat16 instructions is
    # bfloat16).
    model.reshape([*network_size, 3])
    model = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = model.create_infer_request()

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        results = request.infer([pixels])  # one inference, both outputs
        return [results[output] for output in model.outputs]

    return run
