"""Tests for normalcy.detector on small generated images with EfficientNet-Lite0 at 64 px."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import shutil
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image
from safetensors.torch import load_file, save_file

from normalcy import Detector, Prediction
from normalcy import inputs as image_inputs
from normalcy import prediction as prediction_module
from normalcy.data import ImageLoadError
from normalcy.detector import choose_setting
from normalcy.fitting import augmentations
from normalcy.inputs import LoadedImage
from normalcy.methods.patchknn import PatchKNN
from normalcy.modelfile import MODEL_FORMAT_VERSION, ModelFileError

HEIGHT, WIDTH, SQUARE = 80, 96, 16
OPTIONS = {"backbone": "efficientnet_lite0", "image_size": 64}


def normal_image(seed: int) -> np.ndarray:
    """A smooth colour gradient with sensor noise; brightness varies a little per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    base = 60 + 100 * xx / (WIDTH - 1) + 20 * yy / (HEIGHT - 1) + rng.uniform(-8, 8)
    rgb = base[..., None] * np.array([1.0, 0.9, 0.8]) + rng.normal(0, 4, (HEIGHT, WIDTH, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def anomalous_image(seed: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A normal image with a bright square; returns it and the square's top-left corner."""
    image = normal_image(10_000 + seed)
    rng = np.random.default_rng(seed)
    top = int(rng.integers(8, HEIGHT - 8 - SQUARE))
    left = int(rng.integers(8, WIDTH - 8 - SQUARE))
    image[top : top + SQUARE, left : left + SQUARE] = 255
    return image, (top, left)


def _write(folder: Path, images: dict[str, np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images.items():
        Image.fromarray(image).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("detector_data")
    train = _write(root / "train", {f"{i:03d}.png": normal_image(i) for i in range(20)})
    good = _write(root / "good", {f"g{i}.png": normal_image(100 + i) for i in range(5)})
    bad = _write(root / "bad", {f"b{i}.png": anomalous_image(i)[0] for i in range(5)})
    return {"train": train, "good": good, "bad": bad, "root": [root]}


@pytest.fixture(scope="module")
def fitted(data: dict[str, list[Path]]) -> Detector:
    return Detector(**OPTIONS).fit(data["train"][0].parent)


@pytest.fixture(scope="module")
def saved(fitted: Detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("models") / "part-a")


def _scores(predictions: list[Prediction]) -> np.ndarray:
    return np.array([p.score for p in predictions])


def _copy_model(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    return copy


def _format_2_config(model: Path) -> dict:
    """The model's config.json as format 2 held it, the setting's fields spread over
    "backbone", "method" and the top level (the layout of models saved before format 3)."""
    config = json.loads((model / "config.json").read_text())
    setting = config.pop("setting")
    config["format_version"] = 2
    for key in ("image_size", "layers", "context", "tile_scale"):
        config["backbone"][key] = setting[key]
    config["backbone"]["name"] = setting["backbone"]
    config["method"]["name"] = setting["method"]
    for key in ("sigma", "closing", "upsample"):
        config[key] = setting[key]
    return config


def _edit_config(model: Path, **changes: object) -> None:
    config = json.loads((model / "config.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = config
        for parent in parents:
            target = target[parent]
        target[key] = value
    (model / "config.json").write_text(json.dumps(config))


# --- fit and predict -----------------------------------------------------------------------------


def test_anomalous_images_score_higher_than_normal_ones(
    fitted: Detector, data: dict[str, list[Path]]
) -> None:
    good = _scores(fitted.predict(data["good"]))
    bad = _scores(fitted.predict(data["bad"]))
    assert bad.min() > good.max()


def test_anomaly_map_has_the_image_shape_and_peaks_on_the_defect(fitted: Detector) -> None:
    for seed in range(3):
        image, (top, left) = anomalous_image(seed)
        prediction = fitted.predict(image)
        assert prediction.anomaly_map.shape == (HEIGHT, WIDTH)
        assert prediction.anomaly_map.dtype == np.float32
        assert prediction.mask is not None and prediction.mask.shape == (HEIGHT, WIDTH)
        assert prediction.mask.dtype == bool
        row, col = np.unravel_index(np.argmax(prediction.anomaly_map), (HEIGHT, WIDTH))
        margin = 12  # receptive field and 3x3 pooling blur the square's edges
        assert top - margin <= row < top + SQUARE + margin
        assert left - margin <= col < left + SQUARE + margin
        assert prediction.mask[top + SQUARE // 2, left + SQUARE // 2]


def test_every_normal_image_calibrates_the_threshold_scored_without_its_own_patches(
    fitted: Detector, data: dict[str, list[Path]]
) -> None:
    assert fitted.n_train_ == 20
    assert len(fitted.normal_scores_) == 20
    assert fitted.calibration_.images == 20
    assert fitted.calibration_.min_fpr == pytest.approx(1 / 21)
    # 0.01 < 1/21: the largest score, selected rather than recomputed, so bit-identical.
    assert fitted.threshold_ == max(fitted.normal_scores_)
    assert "without its own patches" in fitted.threshold_source_
    method = fitted.method_
    for i in (0, 13):
        # Each left-out score is what a bank without that image's patches would say.
        own = method.bank_sources_ == i
        assert own.any()
        reduced = PatchKNN.from_state(
            method.get_params(), {"memory_bank": method.memory_bank_[~own]}
        )
        probe = copy.copy(fitted)
        probe.method_ = reduced
        left_out = probe.predict(data["train"][i]).score
        assert_close(left_out, fitted.normal_scores_[i])
        assert fitted.predict(data["train"][i]).score < left_out  # its own patches match it


def test_a_rate_below_what_the_normal_images_support_warns_and_says_so(
    data: dict[str, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    detector = Detector(**OPTIONS, fpr=0.01).fit(data["train"][:12])
    assert detector.calibration_.images == 12
    assert "can promise a false-positive rate of 0.0769 at best" in caplog.text
    assert "at least 100 normal images" in caplog.text
    assert detector.threshold_ == max(detector.normal_scores_)  # selected: bit-identical


def test_the_gaussian_calibrates_on_every_tenth_image_held_out(
    data: dict[str, list[Path]],
) -> None:
    detector = Detector(**OPTIONS, method="gaussian").fit(data["train"])
    assert detector.calibration_.images == 2
    assert "every 10th held out" in detector.threshold_source_


def test_an_uncalibrated_fit_scores_like_the_calibrated_one_and_sets_no_threshold(
    fitted: Detector, data: dict[str, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="normalcy"):
        quick = Detector(**OPTIONS).fit(data["train"][0].parent, calibrate=False)
    assert not caplog.records  # no threshold was asked for: nothing to warn about
    assert quick.threshold_ is None and quick.pixel_threshold_ is None
    assert quick.calibration_.scheme == "not calibrated" and quick.n_train_ == 20
    good, bad = quick.predict(data["good"]), quick.predict(data["bad"])
    assert all(p.is_anomalous is None for p in good + bad)
    assert_close(_scores(good + bad), _scores(fitted.predict(data["good"] + data["bad"])))


def test_is_anomalous_follows_the_threshold(fitted: Detector, data: dict[str, list[Path]]) -> None:
    predictions = fitted.predict(data["good"] + data["bad"])
    for prediction in predictions:
        assert prediction.threshold == fitted.threshold_  # the same number, passed on
        assert prediction.is_anomalous is (prediction.score > fitted.threshold_)
    assert all(p.is_anomalous for p in predictions[5:])


def test_a_fixed_threshold_overrides_the_held_out_one(data: dict[str, list[Path]]) -> None:
    detector = Detector(**OPTIONS, threshold=123.0).fit(data["train"][:12])
    assert detector.threshold_ == 123.0 and detector.threshold_source_ == "user"  # kept as given
    assert detector.predict(data["bad"][0]).is_anomalous is False
    detector.set_threshold(0.0)
    assert detector.predict(data["good"][0]).is_anomalous is True


def test_prediction_json_has_the_contract_keys(
    fitted: Detector, data: dict[str, list[Path]]
) -> None:
    row = fitted.predict(data["bad"][0]).to_json()
    assert list(row) == ["name", "score", "is_anomalous", "threshold"]
    assert row["name"] == str(data["bad"][0])
    assert json.loads(json.dumps(row)) == row  # plain JSON types


# --- inputs --------------------------------------------------------------------------------------


def test_single_path_gives_one_prediction_and_a_folder_a_list(
    fitted: Detector, data: dict[str, list[Path]]
) -> None:
    single = fitted.predict(data["good"][0])
    assert isinstance(single, Prediction) and single.name == str(data["good"][0])
    as_text = fitted.predict(str(data["good"][0]))
    assert isinstance(as_text, Prediction)
    assert_close(as_text.score, single.score)
    folder = fitted.predict(data["good"][0].parent)
    assert isinstance(folder, list) and [p.name for p in folder] == [str(p) for p in data["good"]]
    one_item_list = fitted.predict([data["good"][0]])
    assert isinstance(one_item_list, list) and len(one_item_list) == 1


def test_numpy_arrays_and_pil_images_are_accepted(
    fitted: Detector, data: dict[str, list[Path]]
) -> None:
    path = data["bad"][1]
    from_file = fitted.predict(path)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    from_array = fitted.predict(pixels)
    from_pil = fitted.predict(Image.open(path))
    assert isinstance(from_array, Prediction) and isinstance(from_pil, Prediction)
    assert_close([from_array.score, from_pil.score], [from_file.score] * 2)
    batch = fitted.predict(np.stack([pixels, normal_image(5)]))  # a 4-D array is a batch
    assert isinstance(batch, list) and len(batch) == 2
    assert_close(batch[0].score, from_file.score)
    scores = fitted.score([pixels, normal_image(5)])
    assert scores.shape == (2,) and scores[0] > scores[1]


def test_predict_iter_reports_a_corrupt_file_in_place_and_scores_the_rest(
    fitted: Detector, data: dict[str, list[Path]], tmp_path: Path
) -> None:
    shutil.copy(data["good"][0], tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"this is not a png file")
    shutil.copy(data["bad"][0], tmp_path / "c.png")
    results = list(fitted.predict_iter(tmp_path))
    assert [type(r) for r in results] == [Prediction, ImageLoadError, Prediction]
    assert results[1].source == str(tmp_path / "b.png")
    assert [results[0].name, results[2].name] == [str(tmp_path / "a.png"), str(tmp_path / "c.png")]
    assert results[2].score > results[0].score


def test_predict_raises_naming_an_unreadable_input(fitted: Detector, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageLoadError, match="broken.png"):
        fitted.predict(broken)


def test_fit_skips_unreadable_normal_images(data: dict[str, list[Path]], tmp_path: Path) -> None:
    for path in data["train"][:5]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "zzz.png").write_bytes(b"garbage")
    detector = Detector(**OPTIONS).fit(tmp_path)
    assert detector.n_train_ == 5
    assert len(detector.skipped_) == 1 and "zzz.png" in detector.skipped_[0]


def test_predict_before_fit_raises() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        Detector(**OPTIONS).predict(normal_image(0))


@pytest.mark.parametrize(
    ("option", "value"), [("shots", 0), ("fpr", 1.0), ("fpr", -0.1), ("context", -1.0)]
)
def test_invalid_options_are_rejected(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        Detector(**OPTIONS, **{option: value})


# --- few-shot ------------------------------------------------------------------------------------


def test_augmentations_are_the_eight_rotations_and_mirrors() -> None:
    image = normal_image(0)
    views = augmentations(image)
    assert len(views) == 8
    assert sum(v.shape == image.shape for v in views) == 4
    assert all(v.flags.c_contiguous for v in views)
    assert len({v.tobytes() for v in views}) == 8


def test_two_shots_use_leave_one_out_and_set_a_threshold(
    data: dict[str, list[Path]],
) -> None:
    detector = Detector(**OPTIONS, shots=2).fit(data["train"][0].parent)
    assert detector.n_train_ == 2  # the first two images of the folder
    assert len(detector.normal_scores_) == 2
    assert detector.threshold_ == max(detector.normal_scores_)  # selected: bit-identical
    bank = detector.method_.memory_bank_
    assert bank.shape[0] == 2 * 8 * 80  # both references, 8 views, every 8x10 patch kept
    good = _scores(detector.predict(data["good"]))
    bad = _scores(detector.predict(data["bad"]))
    assert bad.min() > good.max()


def test_one_shot_sets_no_threshold_and_warns(
    data: dict[str, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="normalcy"):
        detector = Detector(**OPTIONS, shots=1).fit(data["train"])
    assert detector.threshold_ is None and detector.pixel_threshold_ is None
    assert any("threshold" in r.getMessage() for r in caplog.records)
    prediction = detector.predict(data["bad"][0])
    assert prediction.is_anomalous is None and prediction.mask is None
    assert prediction.threshold is None and prediction.score > 0


def test_more_shots_than_images_is_rejected(data: dict[str, list[Path]]) -> None:
    with pytest.raises(ValueError, match="shots 5"):
        Detector(**OPTIONS, shots=5).fit(data["train"][:3])


# --- save and load -------------------------------------------------------------------------------


def test_loaded_detector_predicts_the_same(
    fitted: Detector, saved: Path, data: dict[str, list[Path]]
) -> None:
    inputs = data["good"][:2] + data["bad"][:2]
    before = fitted.predict(inputs)
    loaded = Detector.load(saved)
    after = loaded.predict(inputs)
    assert_close(_scores(after), _scores(before))
    for a, b in zip(after, before, strict=True):
        assert_close(a.anomaly_map, b.anomaly_map)
        assert (a.mask != b.mask).mean() < 1e-3  # pixels on the threshold may fall either way
        assert a.is_anomalous == b.is_anomalous
    # Thresholds and normal scores are stored, not recomputed: JSON's float text and the
    # arrays file both give back the same bits.
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.threshold_source_ == fitted.threshold_source_
    assert loaded.pixel_threshold_ == fitted.pixel_threshold_
    assert loaded.n_train_ == fitted.n_train_
    np.testing.assert_array_equal(loaded.normal_scores_, fitted.normal_scores_)


def test_context_doubles_the_bank_features_and_survives_saving(
    data: dict[str, list[Path]], tmp_path: Path
) -> None:
    plain = Detector(**OPTIONS, context=0.0).fit(data["train"])
    detector = Detector(**OPTIONS, context=1.0).fit(data["train"])
    assert detector.method_.memory_bank_.shape[1] == 2 * plain.method_.memory_bank_.shape[1]
    good, bad = _scores(detector.predict(data["good"])), _scores(detector.predict(data["bad"]))
    assert min(bad) > max(good)
    loaded = Detector.load(detector.save(tmp_path / "context-model"))
    assert loaded.backbone_.context == 1.0
    # One batch here, two above: another batch composition adds in another order.
    assert_close(_scores(loaded.predict(data["good"] + data["bad"])), np.concatenate([good, bad]))


def test_context_is_on_for_patch_knn_and_off_for_other_methods_by_default(
    fitted: Detector,
) -> None:
    assert fitted.backbone_.context == 1.0
    for method in ("gaussian", "mutual"):
        assert Detector(**OPTIONS, method=method).backbone_model().context == 0.0


def test_a_model_saved_before_the_context_option_loads_without_it(
    data: dict[str, list[Path]], tmp_path: Path
) -> None:
    detector = Detector(**OPTIONS, context=0.0).fit(data["train"])
    model = detector.save(tmp_path / "older-model")
    config = _format_2_config(model)
    del config["backbone"]["context"]
    (model / "config.json").write_text(json.dumps(config))
    inputs = data["good"][:2] + data["bad"][:2]
    loaded = Detector.load(model)
    assert loaded.backbone_.context == 0.0
    assert_close(_scores(loaded.predict(inputs)), _scores(detector.predict(inputs)))


def test_the_dense_map_is_off_by_default_and_changes_maps_only_never_the_fit(
    fitted: Detector, data: dict[str, list[Path]], tmp_path: Path
) -> None:
    assert not fitted.dense_map  # the default
    dense = Detector(**OPTIONS, dense_map=True).fit(data["train"])
    assert_close(dense.method_.memory_bank_, fitted.method_.memory_bank_)
    assert_close(dense.threshold_, fitted.threshold_)
    assert_close(dense.pixel_threshold_, fitted.pixel_threshold_)
    inputs = data["good"] + data["bad"]
    assert_close(_scores(dense.predict(inputs)), _scores(fitted.predict(inputs)))
    image, (top, left) = anomalous_image(0)
    prediction = dense.predict(image)
    assert prediction.anomaly_map.shape == (HEIGHT, WIDTH)
    row, col = np.unravel_index(np.argmax(prediction.anomaly_map), (HEIGHT, WIDTH))
    assert top - 12 <= row < top + SQUARE + 12 and left - 12 <= col < left + SQUARE + 12
    assert not np.allclose(prediction.anomaly_map, fitted.predict(image).anomaly_map)
    loaded = Detector.load(dense.save(tmp_path / "dense-model"))
    assert loaded.dense_map
    assert_close(loaded.predict(image).anomaly_map, prediction.anomaly_map)
    loaded.dense_map = False  # switched on a fitted model: the plain map, no refit
    assert_close(loaded.predict(image).anomaly_map, fitted.predict(image).anomaly_map)


def test_a_dense_map_works_for_every_fitted_method_and_few_shot(
    data: dict[str, list[Path]],
) -> None:
    image, _ = anomalous_image(1)
    for options in ({"method": "gaussian"}, {"method": "patchknn+gaussian"}, {"shots": 2}):
        detector = Detector(**OPTIONS, **options).fit(data["train"])
        plain = detector.predict(image)
        detector.dense_map = True
        dense = detector.predict(image)
        assert_close(dense.score, plain.score)
        assert dense.anomaly_map.shape == (HEIGHT, WIDTH)
        assert not np.allclose(dense.anomaly_map, plain.anomaly_map)
        assert detector.pixel_threshold_ is not None


def test_a_model_saved_before_the_dense_map_option_loads_without_it(
    saved: Path, tmp_path: Path
) -> None:
    model = _copy_model(saved, tmp_path)
    config = _format_2_config(model)
    del config["dense_map"]
    (model / "config.json").write_text(json.dumps(config))
    assert not Detector.load(model).dense_map


def _assert_filled_maps_only(filled: list[Prediction], plain: list[Prediction]) -> None:
    """Same image scores; every map at or above the unfilled one, and some raised (on
    bilinear maps: bicubic upsampling's negative lobes may dip a filled map slightly)."""
    assert_close(_scores(filled), _scores(plain))
    pairs = list(zip(filled, plain, strict=True))
    assert all((a.anomaly_map >= b.anomaly_map - 1e-5).all() for a, b in pairs)
    assert any(not np.allclose(a.anomaly_map, b.anomaly_map) for a, b in pairs)


def test_filling_gaps_changes_maps_only_never_scores_or_thresholds(
    fitted: Detector, data: dict[str, list[Path]], tmp_path: Path
) -> None:
    assert fitted.setting.closing == 3  # the default
    unfilled = Detector(**OPTIONS, closing=1, upsample="bilinear").fit(data["train"])
    filling = Detector(**OPTIONS, upsample="bilinear").fit(data["train"])
    inputs = data["good"] + data["bad"]
    filled, plain = filling.predict(inputs), unfilled.predict(inputs)
    _assert_filled_maps_only(filled, plain)
    assert_close([filling.threshold_, unfilled.threshold_], [fitted.threshold_] * 2)
    loaded = Detector.load(unfilled.save(tmp_path / "unfilled"))
    assert loaded.setting.closing == 1
    assert_close(loaded.predict(inputs[0]).anomaly_map, plain[0].anomaly_map)


def test_bicubic_maps_are_the_default_change_maps_only_and_are_saved(
    fitted: Detector, data: dict[str, list[Path]], tmp_path: Path
) -> None:
    assert fitted.setting.upsample == "bicubic"
    bilinear = Detector(**OPTIONS, upsample="bilinear").fit(data["train"])
    assert_close(bilinear.threshold_, fitted.threshold_)
    image, (top, left) = anomalous_image(3)
    sharp, soft = fitted.predict(image), bilinear.predict(image)
    assert_close(sharp.score, soft.score)
    assert sharp.is_anomalous == soft.is_anomalous
    assert not np.allclose(sharp.anomaly_map, soft.anomaly_map)
    row, col = np.unravel_index(np.argmax(sharp.anomaly_map), (HEIGHT, WIDTH))
    assert top - 12 <= row < top + SQUARE + 12 and left - 12 <= col < left + SQUARE + 12
    assert Detector.load(bilinear.save(tmp_path / "m")).setting.upsample == "bilinear"
    with pytest.raises(ValueError, match="upsample"):
        Detector(upsample="nearest")


def test_a_model_saved_before_upsampling_choices_loads_bilinear(
    saved: Path, tmp_path: Path
) -> None:
    model = _copy_model(saved, tmp_path)
    config = _format_2_config(model)
    del config["upsample"]
    (model / "config.json").write_text(json.dumps(config))
    assert Detector.load(model).setting.upsample == "bilinear"


def test_a_model_saved_before_gap_filling_loads_without_it(saved: Path, tmp_path: Path) -> None:
    model = _copy_model(saved, tmp_path)
    config = _format_2_config(model)
    del config["closing"]
    (model / "config.json").write_text(json.dumps(config))
    assert Detector.load(model).setting.closing == 1


def test_a_model_saved_before_the_precision_option_loads_in_float32(
    saved: Path, tmp_path: Path
) -> None:
    model = _copy_model(saved, tmp_path)
    config = _format_2_config(model)
    assert config["backbone"]["precision"] == "auto"  # the default, decided per machine
    del config["backbone"]["precision"]
    (model / "config.json").write_text(json.dumps(config))
    loaded = Detector.load(model)
    assert loaded.precision == "float32" and loaded.backbone_.precision == "float32"


def test_an_unknown_precision_is_refused_before_fitting() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        Detector(precision="half")


def test_an_image_size_outside_the_backbones_range_is_refused_before_a_fit() -> None:
    with pytest.raises(ValueError, match="must be an integer from 14 to 2048 for dinov2"):
        Detector(image_size=100000)
    with pytest.raises(ValueError, match="from 16 to 2048 for efficientnet_lite0, got 8"):
        Detector(backbone="efficientnet_lite0", image_size=8)


def test_a_closing_narrower_than_one_patch_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 15"):
        Detector(closing=20)  # a model the loader would refuse is never fitted
    with pytest.raises(ValueError, match="closing must be at least 1"):
        Detector(closing=0)


def test_saved_model_is_config_json_and_safetensors_only(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", config["arrays"]]
    assert config["format"] == "normalcy-model"
    assert config["format_version"] == MODEL_FORMAT_VERSION
    setting = config["setting"]
    assert setting["backbone"] == "efficientnet_lite0" and setting["image_size"] == 64
    assert setting["method"] == "patchknn" and setting["layers"] == [4, 10]  # as resolved
    raw = (saved / config["arrays"]).read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])  # the safetensors layout
    assert set(header) - {"__metadata__"} == {"memory_bank", "normal_scores"}
    assert raw[:1] != b"\x80"  # not a pickle stream
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)


def test_loading_never_unpickles(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model load must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    detector = Detector.load(saved)
    assert detector.predict(normal_image(3)).score > 0


def test_saving_over_a_model_leaves_no_temporary_folders_and_one_previous_arrays_file(
    data: dict[str, list[Path]], tmp_path: Path
) -> None:
    detector = Detector(**OPTIONS).fit(data["train"][:12])
    target = tmp_path / "models" / "part-a"
    detector.save(target)
    detector.set_threshold(42.0)
    assert detector.save(target) == target
    assert [p.name for p in target.parent.iterdir()] == ["part-a"]
    config = json.loads((target / "config.json").read_text())
    assert config["threshold"] == 42.0  # the user's number, written as JSON text and read back
    files = sorted(p.name for p in target.iterdir())
    assert len(files) == 3 and "config.json" in files and config["arrays"] in files
    assert Detector.load(target).threshold_ == 42.0


def test_saving_never_deletes_a_folder_that_is_not_a_model(
    fitted: Detector, tmp_path: Path
) -> None:
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"irreplaceable")
    with contextlib.suppress(FileExistsError, ValueError, OSError):
        fitted.save(precious)
    assert (precious / "holiday.jpg").read_bytes() == b"irreplaceable"


def test_saved_model_folder_has_the_usual_permissions(fitted: Detector, tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    target = fitted.save(tmp_path / "shared-model")
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask


def test_another_format_version_is_refused_naming_both(saved: Path, tmp_path: Path) -> None:
    model = _copy_model(saved, tmp_path)
    _edit_config(model, format_version=MODEL_FORMAT_VERSION + 1)
    with pytest.raises(ValueError) as caught:
        Detector.load(model)
    message = str(caught.value)
    assert f"format {MODEL_FORMAT_VERSION + 1}" in message
    assert f"format {MODEL_FORMAT_VERSION}" in message
    assert str(model) in message


def test_a_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no config.json"):
        Detector.load(tmp_path)


def test_a_config_of_another_program_is_refused(saved: Path, tmp_path: Path) -> None:
    model = _copy_model(saved, tmp_path)
    _edit_config(model, format="something-else")
    with pytest.raises(ValueError, match="not a normalcy model"):
        Detector.load(model)


def test_a_mismatched_weights_fingerprint_is_refused(saved: Path, tmp_path: Path) -> None:
    model = _copy_model(saved, tmp_path)
    _edit_config(model, backbone__weights_fingerprint="0" * 16)
    with pytest.raises(ValueError, match="other efficientnet_lite0 weights"):
        Detector.load(model)


def test_loading_with_other_weights_is_refused(
    saved: Path, tmp_path: Path, normalcy_home: Path
) -> None:
    state = load_file(str(normalcy_home / "efficientnet_lite0.safetensors"))
    state["_conv_stem.weight"] = state["_conv_stem.weight"] + 1e-3
    other = tmp_path / "finetuned.safetensors"
    save_file(state, str(other))
    with pytest.raises(ValueError, match="weights"):
        Detector.load(saved, weights=other)
    same = tmp_path / "same.safetensors"
    shutil.copy(normalcy_home / "efficientnet_lite0.safetensors", same)
    assert Detector.load(saved, weights=same).threshold_ is not None


def test_loading_with_weights_that_differ_in_a_later_layer_is_refused(
    saved: Path, tmp_path: Path, normalcy_home: Path
) -> None:
    state = load_file(str(normalcy_home / "efficientnet_lite0.safetensors"))
    state["_blocks.10._bn0.running_mean"] = state["_blocks.10._bn0.running_mean"] + 0.5
    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    with pytest.raises(ValueError, match="weights"):
        Detector.load(saved, weights=other)


# ------------------------------------------------------------------ gaussian
def test_gaussian_method_separates_and_round_trips(
    data: dict[str, list[Path]], tmp_path: Path
) -> None:
    detector = Detector(method="gaussian", **OPTIONS).fit(data["train"][0].parent)
    good, bad = _scores(detector.predict(data["good"])), _scores(detector.predict(data["bad"]))
    assert bad.min() > good.max()
    assert detector.threshold_ is not None and len(detector.normal_scores_) == 2
    loaded = Detector.load(detector.save(tmp_path / "gauss"))
    assert loaded.setting.method == "gaussian"
    assert_close(_scores(loaded.predict(data["bad"])), bad)


def test_gaussian_keeps_only_low_variance_components_when_asked_and_reloads_them(
    data: dict[str, list[Path]], tmp_path: Path
) -> None:
    detector = Detector(method="gaussian", low_variance_fraction=0.2, **OPTIONS)
    detector.fit(data["train"][0].parent)
    full = Detector(method="gaussian", **OPTIONS).fit(data["train"][0].parent)
    assert detector.method_.patch_whitening_.shape[1] < full.method_.patch_whitening_.shape[1]
    bad = _scores(detector.predict(data["bad"]))
    assert not np.allclose(bad, _scores(full.predict(data["bad"])))
    loaded = Detector.load(detector.save(tmp_path / "low"))
    assert loaded.setting.low_variance_fraction == 0.2
    assert_close(_scores(loaded.predict(data["bad"])), bad)


def test_low_variance_fraction_is_refused_outside_the_gaussian_or_range() -> None:
    with pytest.raises(ValueError, match="option of the gaussian method"):
        Detector(low_variance_fraction=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Detector(method="gaussian", low_variance_fraction=1.5)


# --------------------------------------------------------- patchknn+gaussian
def test_fused_method_separates_and_round_trips(
    data: dict[str, list[Path]], fitted: Detector, tmp_path: Path
) -> None:
    detector = Detector(method="patchknn+gaussian", **OPTIONS).fit(data["train"][0].parent)
    predictions = detector.predict(data["bad"])
    good, bad = _scores(detector.predict(data["good"])), _scores(predictions)
    assert bad.min() > good.max()
    # image scores come from the kNN part alone: the same as its bank's patch kNN's
    knn_only = copy.copy(fitted)
    knn_only.method_ = detector.method_.knn_
    assert_close(bad, _scores(knn_only.predict(data["bad"])))
    assert not np.allclose(predictions[0].anomaly_map, knn_only.predict(data["bad"][0]).anomaly_map)
    # standardised on the two held-out normal images of the 20
    assert detector.threshold_ is not None and len(detector.normal_scores_) == 2
    assert detector.backbone_.context == 1.0 and detector.method_.context_half
    loaded = Detector.load(detector.save(tmp_path / "fused"))
    assert loaded.setting.method == "patchknn+gaussian"
    assert_close(_scores(loaded.predict(data["bad"])), bad)


def test_fused_method_refuses_few_shot_naming_the_reason(data: dict[str, list[Path]]) -> None:
    with pytest.raises(ValueError, match="held-out normal images"):
        Detector(method="patchknn+gaussian", shots=4, **OPTIONS).fit(data["train"])
    with pytest.raises(ValueError, match="at least 10 normal images"):
        Detector(method="patchknn+gaussian", **OPTIONS).fit(data["train"][:5])


# ----------------------------------------------------------------- zero-shot
def test_zero_shot_ranks_defects_first_without_references(data: dict[str, list[Path]]) -> None:
    batch = data["train"][:12] + data["bad"][:2]
    results = Detector(method="mutual", **OPTIONS).zero_shot(batch)
    scores = _scores(results)
    assert scores[12:].min() > scores[:12].max()
    assert all(r.is_anomalous is None and r.anomaly_map.shape == (HEIGHT, WIDTH) for r in results)


def test_zero_shot_maps_are_gap_filled_and_its_scores_are_not(
    data: dict[str, list[Path]],
) -> None:
    batch = data["train"][:8] + data["bad"][:2]
    filled = Detector(method="mutual", upsample="bilinear", **OPTIONS).zero_shot(batch)
    plain = Detector(method="mutual", closing=1, upsample="bilinear", **OPTIONS).zero_shot(batch)
    _assert_filled_maps_only(filled, plain)  # type: ignore[arg-type]


def test_zero_shot_reports_unreadable_files_in_place_and_uses_a_given_threshold(
    data: dict[str, list[Path]], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    batch = data["train"][:5] + [broken] + data["bad"][:1]
    results = Detector(method="mutual", threshold=0.0, **OPTIONS).zero_shot(batch)
    assert isinstance(results[5], ImageLoadError) and "broken.png" in str(results[5])
    assert [r.is_anomalous for i, r in enumerate(results) if i != 5] == [True] * 6


def test_zero_shot_refuses_a_batch_too_small_to_compare(data: dict[str, list[Path]]) -> None:
    with pytest.raises(ValueError, match="at least 3 images"):
        Detector(method="mutual", **OPTIONS).zero_shot(data["train"][:2])


def test_fitting_the_zero_shot_method_explains_how_to_use_it(
    data: dict[str, list[Path]],
) -> None:
    with pytest.raises(ValueError, match="zero-shot"):
        Detector(method="mutual", **OPTIONS).fit(data["train"])
    with pytest.raises(ValueError, match="mutual"):
        Detector(**OPTIONS).zero_shot(data["train"])


@pytest.mark.parametrize(
    ("n_normal", "expected"),
    [
        (1, ("patchknn", 1)),
        (16, ("patchknn", 16)),
        (17, ("patchknn", None)),
        (900, ("patchknn", None)),
    ],
)
def test_setting_is_chosen_from_the_number_of_normal_images(
    n_normal: int, expected: tuple[str, int | None]
) -> None:
    assert choose_setting(n_normal) == expected


def test_no_normal_images_points_to_zero_shot() -> None:
    with pytest.raises(ValueError, match="--zero-shot"):
        choose_setting(0)


# --- one lean predict path -----------------------------------------------------------------------

# Threshold and scores (5 normal, then 5 anomalous test images) from the predict path before
# the lean pipeline (commit b853c59: maps and image scores at full image size), float32;
# full-shot patch kNN since its bank holds every normal image and every one calibrates the
# threshold (left out in turn), pinned at the commit that made it so.
BEFORE = {
    "patchknn": (
        0.71447,
        [0.66631, 0.60885, 0.68293, 0.65557, 0.5938]
        + [2.21558, 2.23077, 2.28986, 2.32025, 2.10845],
    ),
    "gaussian": (
        15.85252,
        [14.51775, 13.42023, 14.13557, 13.64953, 12.13102]
        + [84.99882, 84.05561, 80.44372, 69.92724, 69.27593],
    ),
    "patchknn+gaussian": (
        0.62704,
        [0.66378, 0.60787, 0.6741, 0.62077, 0.595] + [2.21617, 2.22798, 2.2876, 2.29873, 2.10878],
    ),
    "3-shot": (
        0.66554,
        [0.65265, 0.62127, 0.7216, 0.56926, 0.62096]
        + [2.21085, 2.20872, 2.25675, 2.30065, 2.13514],
    ),
}


@pytest.mark.parametrize("setting", sorted(BEFORE))
def test_scores_thresholds_and_decisions_are_those_of_the_full_size_path_before(
    setting: str,
) -> None:
    train = [normal_image(i) for i in range(20)]
    test = [normal_image(100 + i) for i in range(5)] + [anomalous_image(i)[0] for i in range(5)]
    options = {"shots": 3} if setting == "3-shot" else {"method": setting}
    detector = Detector(**OPTIONS, **options, precision="float32").fit(train)
    threshold, scores = BEFORE[setting]
    found = detector.predict(test)
    assert detector.threshold_ == pytest.approx(threshold, rel=1e-3)
    np.testing.assert_allclose([p.score for p in found], scores, rtol=1e-3)
    assert [p.is_anomalous for p in found] == [s > threshold for s in scores]


def test_maps_are_made_only_when_read(
    fitted: Detector, data: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple[int, int]] = []
    resize = prediction_module.resize_map
    monkeypatch.setattr(
        prediction_module, "resize_map", lambda m, size: made.append(size) or resize(m, size)
    )
    predictions = fitted.predict(data["bad"])
    assert all(p.is_anomalous for p in predictions) and not made
    assert predictions[0].mask is not None and predictions[0].mask.any()
    assert made == [(HEIGHT, WIDTH)]  # once, for the mask and the map it is drawn from
    assert predictions[0].anomaly_map.shape == (HEIGHT, WIDTH) and len(made) == 1


def test_a_large_image_is_decoded_reduced_and_scored_like_its_small_version(
    fitted: Detector, tmp_path: Path
) -> None:
    image, _ = anomalous_image(2)
    large = np.asarray(Image.fromarray(image).resize((WIDTH * 8, HEIGHT * 8), Image.BILINEAR))
    path = tmp_path / "large.png"
    Image.fromarray(large).save(path)
    prediction = fitted.predict(path)
    assert prediction.image_size == (HEIGHT * 8, WIDTH * 8)
    assert prediction.anomaly_map.shape == (HEIGHT * 8, WIDTH * 8)
    assert prediction.score == pytest.approx(fitted.predict(image).score, rel=0.05)


def test_an_unknown_or_absent_device_is_refused_before_fitting() -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        Detector(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Detector(device="cuda")


def test_a_saved_model_loads_on_the_cpu_and_scores_the_same(
    fitted: Detector, saved: Path, data: dict[str, list[Path]]
) -> None:
    loaded = Detector.load(saved, device="cpu")
    assert loaded.backbone_.device.type == "cpu"
    assert_close(loaded.score(data["bad"]), fitted.score(data["bad"]))


def test_fitting_with_the_dense_map_sets_its_own_mask_level_and_saves_it(
    fitted: Detector, data: dict[str, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dense = Detector(**OPTIONS, dense_map=True).fit(data["train"])
    assert fitted.dense_pixel_threshold_ is None
    assert dense.dense_pixel_threshold_ is not None
    assert dense.dense_pixel_threshold_ != dense.pixel_threshold_
    loaded = Detector.load(dense.save(tmp_path / "dense"))
    # Mask levels are stored and passed on, never recomputed: the same bits throughout.
    assert loaded.dense_pixel_threshold_ == dense.dense_pixel_threshold_
    image, _ = anomalous_image(4)
    prediction = loaded.predict(image)
    assert prediction.pixel_threshold == dense.dense_pixel_threshold_
    loaded.dense_map = False
    assert loaded.predict(image).pixel_threshold == dense.pixel_threshold_
    plain = Detector.load(fitted.save(tmp_path / "plain"))
    plain.dense_map = True
    with caplog.at_level(logging.WARNING, logger="normalcy"):
        assert plain.predict(image).pixel_threshold == fitted.pixel_threshold_
    assert "fitted without the dense map" in caplog.text


def test_abandoning_a_prediction_stream_stops_its_decoding_thread(
    fitted: Detector, data: dict[str, list[Path]]
) -> None:
    def decoding() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("normalcy-decode")}

    before = decoding()
    stream = fitted.predict_iter(data["good"] * 20)
    next(stream)
    stream.close()
    for _ in range(50):
        running = decoding() - before
        if not running:
            break
        time.sleep(0.05)
    assert not running


def test_a_decoding_error_of_the_reader_reaches_the_caller(
    data: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    load_one = image_inputs.load_one

    def broken(source, index, *args):
        if index == 1:
            raise OSError("disk gone")
        return load_one(source, index, *args)

    monkeypatch.setattr(image_inputs, "load_one", broken)
    stream = image_inputs.decoded_ahead(data["good"], None, threads=1)
    assert isinstance(next(stream), LoadedImage)
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


@pytest.mark.parametrize("threads", [1, 3])
def test_decoding_ahead_keeps_the_order_and_errors_in_place(
    data: dict[str, list[Path]], tmp_path: Path, threads: int
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    sources = [*data["good"], broken, *data["bad"]] * 3
    names = [
        item.name if isinstance(item, LoadedImage) else item.source
        for item in image_inputs.decoded_ahead(sources, None, threads)
    ]
    assert names == [str(s) for s in sources]
    errors = [i for i, s in enumerate(sources) if s == broken]
    decoded = list(image_inputs.decoded_ahead(sources, None, threads))
    assert all(isinstance(decoded[i], ImageLoadError) for i in errors)


def test_abandoning_a_pool_of_decoding_threads_stops_them(data: dict[str, list[Path]]) -> None:
    stream = image_inputs.decoded_ahead(data["good"] * 50, None, threads=3)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("normalcy-decode_")]


def test_a_few_shot_fit_of_ten_or_more_keeps_every_reference_and_calibrates_on_each(
    data: dict[str, list[Path]],
) -> None:
    references = data["train"][:12]
    augmented = Detector(**OPTIONS, shots=12).fit(references)
    plain = Detector(**OPTIONS, shots=12, augment=False).fit(references)
    for detector in (augmented, plain):
        assert detector.n_train_ == 12
        assert detector.calibration_.images == 12  # one score per reference, none held out
        assert "without its own patches" in detector.calibration_.scheme
    # every reference is in the bank, with its 8 augmented views
    assert augmented.method_.n_patches_seen_ == 8 * plain.method_.n_patches_seen_
