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
from PIL import Image

from normalcy.data import ImageInput, ImageLoadError
from normalcy.inputs import LoadedImage, decoded_ahead, expand_inputs
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


# engine -> the precisions it runs (onnxruntime's CPU kernels have no bfloat16 arithmetic)
PRECISIONS = {"onnxruntime": ("float32",), "openvino": ("float32", "bfloat16")}
ENGINES = tuple(PRECISIONS)


def resize_pixels(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) pixels -> (h, w, 3) float32 at `size`, by the antialiased bilinear filter of
    the library's resize (torch's `interpolate(..., antialias=True)`), within 0.01 of 255:
    Pillow's BILINEAR on each channel as 32-bit floats. For engines whose resize lacks
    antialiasing (OpenVINO): the image then reaches the graph at its network size, where the
    graph's resize is the identity. One thread and no BLAS, so it takes no core from the
    engine's own threads."""
    channels = [
        Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F")
        for c in range(image.shape[2])
    ]
    target = (size[1], size[0])
    return np.stack(
        [np.asarray(c.resize(target, Image.Resampling.BILINEAR)) for c in channels], axis=-1
    )


class ExportedModel:
    """An exported model and its engine: `predict` as `Detector.predict`.

    engine: "onnxruntime" or "openvino" (None: onnxruntime for an ONNX graph, openvino for
    OpenVINO's format).
    precision: "float32" (scores as the library's in float32) or, on OpenVINO, "bfloat16":
    faster on CPUs with bfloat16 instructions, scores within about 1% of float32's (see
    docs/export.md for the measured deviation).
    """

    def __init__(
        self, folder: str | os.PathLike, engine: str | None = None, precision: str = "float32"
    ) -> None:
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
        if precision not in PRECISIONS[self.engine]:
            raise ValueError(
                f"precision {precision!r} is not available on {self.engine}; choose one of "
                f"{PRECISIONS[self.engine]}"
            )
        self.precision = precision
        self.network_size = tuple(self.manifest_["input"]["network_size"])
        try:
            if self.engine == "onnxruntime":
                self._run = _onnxruntime(graph)
            else:
                self._run = _openvino(graph, self.network_size, precision)
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
            "precision": self.precision,
        }

    def predict(self, x: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Prediction for one image, or a list for several (a folder, a list, a 4-D array).
        Raises ImageLoadError naming the input when an image cannot be read."""
        return gathered(self.predict_iter(x), x)


def load(
    folder: str | os.PathLike, engine: str | None = None, precision: str = "float32"
) -> ExportedModel:
    """The exported model in `folder` (written by `normalcy export`), checked, on `engine` in
    `precision` (see `ExportedModel`): a missing, corrupted or mismatched file raises
    `ExportFileError` naming it."""
    return ExportedModel(folder, engine, precision)


def _onnxruntime(graph: Path) -> Callable[[np.ndarray], list]:
    """A session on the graph (it resizes images of any size itself)."""
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


def _openvino(
    graph: Path, network_size: tuple[int, int], precision: str
) -> Callable[[np.ndarray], list]:
    try:
        import openvino
    except ImportError:
        raise ImportError("engine='openvino' needs openvino: pip install openvino") from None
    core = openvino.Core()
    model = core.read_model(graph)
    # Fixed at the network size it is always given (a dynamic shape runs several times
    # slower); the precision always named, since OpenVINO's default on CPUs with bfloat16
    # instructions is bfloat16. One image at a time: tuned for latency.
    model.reshape([*network_size, 3])
    hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
    model = core.compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    )
    request = model.create_infer_request()

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        results = request.infer([pixels])  # one inference, both outputs
        return [results[output] for output in model.outputs]

    return run
