"""What of a fitted `Detector` goes into a model folder, and the detector made back from one
(the folder's files, their checks and atomic writing: `modelfile`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from normalcy import __version__
from normalcy.backbones import Backbone, create_backbone
from normalcy.calibration import Calibration
from normalcy.methods import method_from_state
from normalcy.modelfile import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    ModelFileError,
    read_model,
    save_model,
)

if TYPE_CHECKING:
    from normalcy.detector import Detector


def weights_fingerprint(backbone: Backbone) -> str:
    """A short hash of every tensor the backbone uses: tells weight sets apart."""
    digest = hashlib.sha256()
    for name, tensor in backbone.network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_config(detector: Detector) -> dict[str, Any]:
    """The model folder's config: the settings and the fitted thresholds (`config.json`)."""
    backbone = detector.backbone_
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "normalcy_version": __version__,
        "backbone": {
            "name": detector.backbone,
            "image_size": detector.image_size,
            "layers": list(backbone.layers),
            "pool": backbone.pool,
            "context": backbone.context,
            "precision": detector.precision,
            "weights_fingerprint": weights_fingerprint(backbone),
            "tile_scale": detector.tile_scale,
        },
        "method": {"name": detector.method, "params": detector.method_.get_params()},
        "shots": detector.shots,
        "augment": detector.augment,
        "fpr": detector.fpr,
        "sigma": detector.sigma,
        "dense_map": detector.dense_map,
        "closing": detector.closing,
        "upsample": detector.upsample,
        "threshold": detector.threshold_,
        "threshold_source": detector.threshold_source_,
        "pixel_threshold": detector.pixel_threshold_,
        "dense_pixel_threshold": detector.dense_pixel_threshold_,
        "n_train": detector.n_train_,
        "input_size": detector.input_size_,
        "calibration": None if detector.calibration_ is None else detector.calibration_.to_json(),
    }


def save_detector(detector: Detector, path: str | os.PathLike) -> Path:
    """Write the model folder (see `modelfile`: atomic, never absent, user files kept)."""
    arrays = dict(detector.method_.arrays())
    arrays["normal_scores"] = np.asarray(detector.normal_scores_, dtype=np.float64)
    return save_model(path, model_config(detector), arrays)


def load_detector(
    cls: type[Detector],
    path: str | os.PathLike,
    weights: str | os.PathLike | None,
    device: str,
    precision: str | None,
) -> Detector:
    """The detector saved in `path` (see `Detector.load`)."""
    config, arrays, arrays_file = read_model(path)
    backbone = config["backbone"]
    method = config["method"]
    params = method["params"]
    if precision is not None and "precision" in params:  # the search's, as the backbone's
        params = {**params, "precision": precision}
    try:
        detector = cls(
            backbone=backbone["name"],
            method=method["name"],
            coreset_ratio=params.get("coreset_ratio", 0.1),
            max_bank_size=params.get("max_bank_size", 10_000),
            seed=params.get("seed", 0),
            image_size=backbone["image_size"],
            layers=backbone["layers"],
            shots=config["shots"],
            augment=config["augment"],
            fpr=config["fpr"],
            sigma=config["sigma"],
            weights=weights,
            context=backbone["context"],
            dense_map=config["dense_map"],
            closing=config["closing"],
            upsample=config["upsample"],
            precision=precision or backbone["precision"],
            low_variance_fraction=params.get("low_variance_fraction"),
            device=device,
            tile_scale=backbone["tile_scale"],
        )
        detector.method_ = method_from_state(method["name"], params, arrays)
        calibration = config["calibration"]
        detector.calibration_ = None if calibration is None else Calibration(**calibration)
    except (TypeError, ValueError) as error:
        raise ModelFileError(arrays_file, str(error)) from None
    detector.normal_scores_ = arrays.get("normal_scores", np.zeros(0))
    detector.threshold_ = config["threshold"]
    detector.threshold_source_ = config["threshold_source"]
    detector.pixel_threshold_ = config["pixel_threshold"]
    detector.dense_pixel_threshold_ = config["dense_pixel_threshold"]
    detector.n_train_ = config["n_train"]
    detector.input_size_ = config["input_size"]
    detector.normalcy_version_ = config.get("normalcy_version")
    detector.backbone_ = create_backbone(
        backbone["name"],
        backbone["image_size"],
        tuple(backbone["layers"]),
        pool=backbone["pool"],
        weights=weights,
        context=detector.context,
        precision=detector.precision,
        device=device,
        tile_scale=detector.tile_scale,
    )
    if weights_fingerprint(detector.backbone_) != backbone["weights_fingerprint"]:
        raise ValueError(
            f"{path} was fitted with other {backbone['name']} weights than the ones found "
            "now; its memory bank would not match these features. Pass the original weights."
        )
    expected = detector.method_.n_features_in_
    found = None if expected is None else detector.backbone_.feature_dims()
    if expected != found:
        raise ModelFileError(
            arrays_file,
            f"holds {expected}-dim features; {backbone['name']} with this config gives {found}",
        )
    return detector
