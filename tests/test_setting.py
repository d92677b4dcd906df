"""Tests for normalcy.setting: one validated value for everything that decides features and
scores, spoken alike by Detector, the CLI and config.json."""

from __future__ import annotations

import dataclasses
import json

import pytest

from normalcy import Detector
from normalcy.cli import build_parser
from normalcy.cli.options import setting_from
from normalcy.setting import AUTO, CLI_NAMES, DEFAULT, FIELDS, SETTINGS, Setting, named_setting

BAD = {
    "unknown backbone": ({"backbone": "resnet"}, "unknown backbone 'resnet'"),
    "input below the stride": ({"image_size": 10}, "from 14 to 2048 for dinov2_vits14"),
    "input as text": ({"image_size": "224"}, "image_size must be an integer"),
    "tile scale zero": ({"tile_scale": 0}, "tile_scale must be in"),
    "no layers": ({"layers": ()}, "layers must be a non-empty list"),
    "negative layer": ({"layers": (-1,)}, "layers must be a non-empty list"),
    "context too large": ({"context": 1000}, "context must be from 0 to 100"),
    "unknown method": ({"method": "svm"}, "unknown method 'svm'"),
    "coreset ratio zero": ({"coreset_ratio": 0.0}, "coreset_ratio must be in"),
    "bank size as a float": ({"max_bank_size": 10.5}, "max_bank_size must be a positive"),
    "low variance for patch kNN": ({"low_variance_fraction": 0.1}, "option of the gaussian"),
    "closing zero": ({"closing": 0}, "closing must be at least 1"),
    "closing as a boolean": ({"closing": True}, "closing must be at least 1"),
    "sigma not finite": ({"sigma": float("nan")}, "sigma must be from 0"),
    "unknown upsampling": ({"upsample": "nearest"}, "upsample must be one of"),
}


@pytest.mark.parametrize(("changes", "message"), BAD.values(), ids=list(BAD))
def test_a_bad_field_is_refused_naming_it_by_the_setting_the_detector_and_the_cli(
    changes: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Setting(**changes)
    with pytest.raises(ValueError, match=message):
        Detector(**changes)
    with pytest.raises(ValueError, match=message):
        Setting.from_json({**DEFAULT.to_json(), **changes})


def test_a_setting_is_frozen_and_changes_make_a_new_one() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.image_size = 448  # type: ignore[misc]
    larger = DEFAULT.replace(image_size=448, layers=[5, 6])
    assert larger.image_size == 448 and larger.layers == (5, 6) and DEFAULT.image_size == 224
    with pytest.raises(TypeError, match="not a setting: speed; its fields: backbone"):
        DEFAULT.replace(speed=2)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_named_setting_survives_json_and_its_command_line(name: str) -> None:
    setting = named_setting(name)
    assert Setting.from_json(json.loads(json.dumps(setting.to_json()))) == setting
    args = build_parser().parse_args(["fit", "train", "-o", "model", *setting.flags()])
    assert setting_from(args) == setting


def test_a_json_setting_with_a_missing_or_unknown_field_is_refused_naming_both() -> None:
    data = DEFAULT.to_json()
    del data["closing"]
    data["speed"] = 1
    with pytest.raises(ValueError, match="missing closing; unknown speed"):
        Setting.from_json(data)


def test_the_detector_takes_a_setting_by_value_or_name_and_changes_to_its_fields() -> None:
    fine = named_setting("fine-detail")
    assert Detector(fine).setting == fine
    assert Detector("fine-detail").setting == fine
    assert Detector("fine-detail", layers=[10]).setting == SETTINGS["fine-detail-outline"]
    copy = Detector(**Detector("dinov2-448", shots=2).get_params())
    assert copy.setting == SETTINGS["dinov2-448"] and copy.shots == 2
    with pytest.raises(ValueError, match="unknown setting 'boards'; choose one of"):
        Detector("boards")
    with pytest.raises(TypeError, match="not a setting: imagesize"):
        Detector(imagesize=448)


def test_cli_options_change_the_named_setting_and_only_those_given() -> None:
    parse = build_parser().parse_args
    args = parse(["fit", "t", "-o", "m", "--setting", "fine-detail", "--closing", "3"])
    assert setting_from(args) == SETTINGS["fine-detail"].replace(closing=3)
    assert setting_from(parse(["fit", "t", "-o", "m"])) == AUTO  # chosen by the fit
    assert setting_from(parse(["fit", "t", "-o", "m", "--image-size", "448"])) == DEFAULT.replace(
        image_size=448
    )  # an option pins the default setting, changed
    eval_args = parse(["eval", "data", "--method", "gaussian", "--low-variance", "0.1"])
    assert setting_from(eval_args).low_variance_fraction == 0.1


def test_every_field_of_a_setting_has_a_fit_option() -> None:
    options = vars(build_parser().parse_args(["fit", "t", "-o", "m"]))
    assert {CLI_NAMES.get(field, field) for field in FIELDS} <= set(options)
