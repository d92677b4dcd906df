"""A fitted model as one ONNX graph that scores like the library, for runtimes without torch.

The graph is the library's own predict path, traced at one network input size: the decoded
image (H, W, 3) of any size is resized to that size by the library's resize, normalised,
run through the backbone in float32, scored by the method's `export_module` (matrix products
in place of the search library) and turned into the image score and the map at the fixed scale
by the functions `Pipeline` uses. Decoding stays outside, in `normalcy.data`, which the runtime
shares. Beside the graph, `export.json` holds what the runtime needs: thresholds, input size,
decoding size, the graph's checksum and the normalcy version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normalcy import __version__
from normalcy.backbones import Backbone, network_input
from normalcy.detector import Detector
from normalcy.pipeline import MapSettings, grid_image_score
from normalcy.runtime import EXPORT_FILE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION

GRAPH_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "score_map")
FORMATS = ("onnx", "openvino")
OPSET = 18  # the first with antialiased Resize, which the library's resize needs


class ScoringGraph(nn.Module):
    """One decoded image (H, W, 3) float32 RGB values 0-255, any size -> (image score, map at
    the fixed scale)."""

    def __init__(
        self, backbone: Backbone, scorer: nn.Module, maps: MapSettings, size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.scorer = scorer
        self.maps = maps
        self.size = size

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scorer(self.backbone.image_grid(network_input(image, self.size)))
        score = grid_image_score(scores, self.maps)
        return score, self.maps.shown_map(scores.patches, dense=False)


def export_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    size: tuple[int, int] | None = None,
    weights: str | os.PathLike | None = None,
    format: str = "onnx",
) -> Path:
    """Export the model saved in `model_dir` to the folder `out` (graph and export.json) for
    network inputs of `size` (height, width; default: the input size of most of its training
    images; for a tiled model the size its images are tiled at), as ONNX or OpenVINO's format
    (`format`). Raises `NotExportable` for a model that has no graph, saying why."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    detector = Detector.load(model_dir, weights=weights, device="cpu", precision="float32")
    size = _checked_size(detector, size)
    graph = ScoringGraph(
        detector.backbone_, detector.method_.export_module(), detector.map_settings(), size
    ).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(size[0], size[1], 3)
    height, width = torch.export.Dim("height", min=1), torch.export.Dim("width", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its notes on its own internals
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: height, 1: width},),
                external_data=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    target = out / GRAPH_FILE
    partial = target.with_suffix(".onnx.partial")
    program.save(str(partial))
    os.replace(partial, target)
    files = [target]
    if format == "openvino":
        files = _to_openvino(target)
        target.unlink()
    manifest = _manifest(detector, size, files)
    (out / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _to_openvino(graph: Path) -> list[Path]:
    """The ONNX graph converted to OpenVINO's own format (model.xml and model.bin), weights
    kept in float32."""
    try:
        import openvino
    except ImportError:
        raise ImportError("--format openvino needs openvino: pip install openvino") from None
    target = graph.with_suffix(".xml")
    openvino.save_model(openvino.convert_model(graph), target, compress_to_fp16=False)
    return [target, target.with_suffix(".bin")]


def _checked_size(detector: Detector, size: tuple[int, int] | None) -> tuple[int, int]:
    stride = detector.backbone_.stride
    if size is None:
        if detector.input_size_ is None:  # saved before it was recorded: a square image
            side = detector.active_setting.image_size
            return detector.backbone_.network_size(side, side)
        return tuple(detector.input_size_)  # type: ignore[return-value]
    if any(side < stride or side % stride for side in size):
        raise ValueError(
            f"--image-size {size[0]} {size[1]}: each side must be a multiple of the "
            f"{detector.active_setting.backbone} stride ({stride} px)"
        )
    return tuple(size)  # type: ignore[return-value]


def _manifest(detector: Detector, size: tuple[int, int], files: list[Path]) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "normalcy_version": __version__,
        "graph": files[0].name,
        "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
        "input": {
            "name": INPUT_NAME,
            "layout": "height, width, RGB; float32 values 0-255; any size, resized to "
            "network_size in the graph",
            "network_size": list(size),
            "decode_side": detector.decode_side,
        },
        "outputs": list(OUTPUT_NAMES),
        "precision": "float32",
        "backbone": detector.active_setting.backbone,
        "method": detector.active_setting.method,
        "shots": detector.shots,
        "threshold": detector.threshold_,
        "pixel_threshold": detector.pixel_threshold_,
    }
