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
from normalcy.selection import Selection
from normalcy.setting import Setting

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
    """The model folder's config: the setting (its layers and context weight as the backbone
    resolved them, so a later default cannot change the model), how it was fitted and its
    thresholds (`config.json`)."""
    backbone = detector.backbone_
    setting = detector.active_setting.replace(layers=backbone.layers, context=backbone.context)
    selection = getattr(detector, "selection_", None)
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "normalcy_version": __version__,
        "setting": setting.to_json(),
        # How "auto" chose it: every candidate's planted-defect results (None: given).
        "selection": None if selection is None else selection.to_json(),
        "backbone": {
            "pool": backbone.pool,
            "precision": detector.precision,
            "weights_fingerprint": weights_fingerprint(backbone),
        },
        "method": {"params": detector.method_.get_params()},
        "shots": detector.shots,
        "augment": detector.augment,
        "fpr": detector.fpr,
        "dense_map": detector.dense_map,
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
    setting = Setting.from_json(config["setting"])  # checked by read_model
    backbone = config["backbone"]
    params = config["method"]["params"]
    if precision is not None and "precision" in params:  # the search's, as the backbone's
        params = {**params, "precision": precision}
    try:
        detector = cls(
            setting,
            seed=params.get("seed", 0),
            shots=config["shots"],
            augment=config["augment"],
            fpr=config["fpr"],
            weights=weights,
            dense_map=config["dense_map"],
            precision=precision or backbone["precision"],
            device=device,
        )
        detector.method_ = method_from_state(setting.method, params, arrays)
        selection = config["selection"]
        detector.selection_ = None if selection is None else Selection.from_json(selection)
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
        setting.backbone,
        setting.image_size,
        setting.layers,
        pool=backbone["pool"],
        weights=weights,
        context=setting.context_weight,
        precision=detector.precision,
        device=device,
        tile_scale=setting.tile_scale,
    )
    if weights_fingerprint(detector.backbone_) != backbone["weights_fingerprint"]:
        raise ValueError(
            f"{path} was fitted with other {setting.backbone} weights than the ones found "
            "now; its memory bank would not match these features. Pass the original weights."
        )
    expected = detector.method_.n_features_in_
    found = None if expected is None else detector.backbone_.feature_dims()
    if expected != found:
        raise ModelFileError(
            arrays_file,
            f"holds {expected}-dim features; {setting.backbone} with this config gives {found}",
        )
    return detector
