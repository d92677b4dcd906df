"""Tests for normalcy.modelfile: atomic saves that never lose a model, validated loads.

Arrays are stored and read back as bytes, so they are compared exactly."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from normalcy import Detector
from normalcy.cli import main
from normalcy.modelfile import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    ModelFileError,
    read_model,
    save_model,
)
from normalcy.setting import Setting

ARRAYS = {"memory_bank": np.arange(64, dtype=np.float32).reshape(8, 8)}
SETTING = Setting(backbone="efficientnet_lite0", image_size=64, layers=(3, 4), context=0.0)


def config(**changes: object) -> dict:
    """A valid config of the current format, with top-level `changes`."""
    base = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "normalcy_version": "test",
        "setting": SETTING.to_json(),
        "backbone": {"pool": 3, "precision": "float32", "weights_fingerprint": "0123"},
        "method": {"params": {}},
        "shots": None,
        "augment": True,
        "fpr": 0.01,
        "dense_map": False,
        "threshold": 1.5,
        "threshold_source": "held-out normal images",
        "pixel_threshold": 2.0,
        "dense_pixel_threshold": None,
        "n_train": 10,
    }
    return {**base, **changes}


def legacy_config(version: int) -> dict:
    """A valid config of format 1 or 2: the setting's fields spread over "backbone",
    "method" and the top level."""
    legacy = config(format_version=version)
    del legacy["setting"]
    legacy["backbone"].update(
        name="efficientnet_lite0", image_size=64, layers=[3, 4], context=0.0, tile_scale=None
    )
    legacy["method"]["name"] = "patchknn"
    legacy.update(sigma=4.0, closing=3, upsample="bicubic")
    return legacy


def arrays_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))


def test_a_saved_model_reads_back_with_its_arrays(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "m", config(threshold=3.0), ARRAYS)
    loaded, arrays, arrays_file = read_model(folder)
    assert loaded["threshold"] == 3.0
    assert arrays_file.parent == folder and arrays_file.name == loaded["arrays"]
    np.testing.assert_array_equal(arrays["memory_bank"], ARRAYS["memory_bank"])


def test_saving_over_a_model_keeps_the_previous_arrays_for_one_more_save(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    names = []
    for threshold in (1.0, 2.0, 3.0):
        save_model(folder, config(threshold=threshold), ARRAYS)
        names.append(read_model(folder)[0]["arrays"])
    assert len(set(names)) == 3
    assert arrays_files(folder) == sorted(names[1:])  # the current and the one before
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", *names[1:]])
    assert read_model(folder)[0]["threshold"] == 3.0


def test_a_killed_saves_leftovers_are_removed_by_the_next_save(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "m", config(), ARRAYS)
    (folder / "method-00000000000000ff.safetensors").write_bytes(b"half written")
    (folder / ".config.json.tmp-00000000000000ff").write_text("{")
    legacy = tmp_path / ".m.old-12345"  # what saves before format 2 could leave beside it
    shutil.copytree(folder, legacy)
    save_model(folder, config(), ARRAYS)
    current = read_model(folder)[0]["arrays"]
    assert "method-00000000000000ff.safetensors" not in arrays_files(folder)
    assert not (folder / ".config.json.tmp-00000000000000ff").exists()
    assert current in arrays_files(folder)
    assert not legacy.exists()


@pytest.mark.parametrize("foreign", ["notes.txt", ".hidden", "sub/"])
def test_a_folder_holding_other_files_is_refused_and_left_alone(
    tmp_path: Path, foreign: str
) -> None:
    folder = save_model(tmp_path / "m", config(), ARRAYS)
    before = read_model(folder)[0]["arrays"]
    if foreign.endswith("/"):
        (folder / foreign).mkdir()
    else:
        (folder / foreign).write_text("the user's")
    with pytest.raises(FileExistsError, match=foreign.rstrip("/")):
        save_model(folder, config(threshold=9.0), ARRAYS)
    assert (folder / foreign.rstrip("/")).exists()
    assert read_model(folder)[0]["arrays"] == before


def test_a_config_of_another_program_is_never_saved_over(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"name": "another tool"}')
    with pytest.raises(FileExistsError, match="not part of a normalcy model"):
        save_model(folder, config(), ARRAYS)
    assert json.loads((folder / "config.json").read_text()) == {"name": "another tool"}


def test_a_file_where_the_folder_should_be_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_model(target, config(), ARRAYS)
    assert target.read_text() == "a file"


def test_a_symlinked_model_folder_is_written_through_and_kept(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_model(link, config(), ARRAYS)
    assert link.is_symlink()
    assert read_model(real)[0]["arrays"] == read_model(link)[0]["arrays"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="symbolic link"):
        save_model(dangling, config(), ARRAYS)


def test_saved_files_and_folders_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        folder = save_model(tmp_path / "m", config(), ARRAYS)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def test_a_model_of_format_1_loads_and_is_saved_over_in_the_current_format(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    old = legacy_config(1)
    (folder / "config.json").write_text(json.dumps(old))
    save_file(ARRAYS, str(folder / "method.safetensors"))
    loaded, arrays, arrays_file = read_model(folder)
    assert arrays_file.name == "method.safetensors"
    assert Setting.from_json(loaded["setting"]) == SETTING
    np.testing.assert_array_equal(arrays["memory_bank"], ARRAYS["memory_bank"])
    save_model(folder, config(), ARRAYS)
    save_model(folder, config(), ARRAYS)
    assert "method.safetensors" not in arrays_files(folder)
    assert read_model(folder)[0]["format_version"] == MODEL_FORMAT_VERSION


def test_keys_missing_from_older_models_get_the_behaviour_they_were_saved_with(
    tmp_path: Path,
) -> None:
    old = legacy_config(2)
    for key in ("dense_map", "closing", "upsample", "dense_pixel_threshold"):
        del old[key]
    del old["backbone"]["context"], old["backbone"]["precision"], old["backbone"]["tile_scale"]
    folder = save_model(tmp_path / "m", old, ARRAYS)
    loaded = read_model(folder)[0]
    assert loaded["dense_map"] is False and loaded["dense_pixel_threshold"] is None
    assert Setting.from_json(loaded["setting"]) == SETTING.replace(closing=1, upsample="bilinear")
    assert loaded["backbone"]["precision"] == "float32"


def test_a_format_2_config_without_a_field_it_always_held_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    old = legacy_config(2)
    del old["backbone"]["image_size"]
    folder = save_model(tmp_path / "m", old, ARRAYS)
    with pytest.raises(ModelFileError, match="'backbone.image_size' is missing"):
        read_model(folder)


BAD_CONFIGS = {
    "image size far too large": ({"setting": SETTING.to_json() | {"image_size": 10**5}}, "setting"),
    "threshold NaN": ({"threshold": math.nan}, "threshold"),
    "threshold a string": ({"threshold": "high"}, "threshold"),
    "fpr above 1": ({"fpr": 1.5}, "fpr"),
    "no layers": ({"setting": SETTING.to_json() | {"layers": []}}, "setting"),
    "layers as text": ({"setting": SETTING.to_json() | {"layers": "3,4"}}, "setting"),
    "an unknown setting field": ({"setting": SETTING.to_json() | {"speed": 9}}, "setting"),
    "setting not an object": ({"setting": [1]}, "setting"),
    "arrays outside the folder": ({"arrays": "../../secret.safetensors"}, "arrays"),
    "method not an object": ({"method": "patchknn"}, "method"),
    "boolean as a count": ({"n_train": True}, "n_train"),
}


@pytest.mark.parametrize("changes, key", BAD_CONFIGS.values(), ids=list(BAD_CONFIGS))
def test_an_invalid_config_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, changes: dict, key: str
) -> None:
    folder = save_model(tmp_path / "m", config(), ARRAYS)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, **changes}))
    with pytest.raises(ModelFileError) as caught:
        read_model(folder)
    assert str(folder / "config.json") in str(caught.value)
    assert repr(key) in str(caught.value)


def test_a_missing_config_key_is_named(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "m", config(), ARRAYS)
    saved = json.loads((folder / "config.json").read_text())
    del saved["n_train"]
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ModelFileError, match="'n_train' is missing"):
        read_model(folder)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe not json", b"[1, 2]", b"null"])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path: Path, content: bytes) -> None:
    folder = save_model(tmp_path / "m", config(), ARRAYS)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ModelFileError, match="config.json"):
        read_model(folder)


def _corrupt_arrays(folder: Path, damage: str) -> Path:
    path = folder / read_model(folder)[0]["arrays"]
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    else:  # replaced by a folder
        path.unlink()
        path.mkdir()
    return path


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "folder"])
def test_a_damaged_arrays_file_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    folder = save_model(tmp_path / "m", config(), ARRAYS)
    path = _corrupt_arrays(folder, damage)
    with pytest.raises(ModelFileError) as caught:
        read_model(folder)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "bank, problem",
    [
        (np.full((4, 8), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((4, 8), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.ones((4, 8), dtype=np.int8), "not floating point"),
    ],
    ids=["nan", "inf", "int8"],
)
def test_arrays_with_unusable_values_are_refused(
    tmp_path: Path, bank: np.ndarray, problem: str
) -> None:
    folder = save_model(tmp_path / "m", config(), {"memory_bank": bank})
    with pytest.raises(ModelFileError, match=problem):
        read_model(folder)


def _within_seconds(seconds: float, action) -> BaseException | None:
    """Run `action` in a thread; fail if it does not finish in time (a blocking read)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("which", ["config", "arrays"])
def test_a_fifo_in_place_of_a_model_file_is_refused_without_hanging(
    tmp_path: Path, which: str
) -> None:
    folder = save_model(tmp_path / "m", config(), ARRAYS)
    target = folder / ("config.json" if which == "config" else read_model(folder)[0]["arrays"])
    target.unlink()
    os.mkfifo(target)
    error = _within_seconds(10, lambda: read_model(folder))
    assert isinstance(error, ModelFileError)
    assert "not a regular file" in str(error) and str(target) in str(error)


@pytest.mark.arithmetic_free
def test_saves_killed_at_any_moment_never_lose_the_model_for_a_racing_reader(
    tmp_path: Path,
) -> None:
    folder = save_model(tmp_path / "m", config(threshold=0.0), ARRAYS)
    stop = tmp_path / "stop"
    report = tmp_path / "reader.json"
    reader = os.fork()
    if reader == 0:  # a reader that loads the model as fast as it can
        reads = failures = 0
        while not stop.exists():
            try:
                read_model(folder)
            except Exception:  # noqa: BLE001 - counted
                failures += 1
            reads += 1
        report.write_text(json.dumps({"reads": reads, "failures": failures}))
        os._exit(0)
    rng = random.Random(0)
    kills = 1000
    try:
        for _ in range(kills):
            saver = os.fork()
            if saver == 0:  # saves until killed
                for threshold in range(1, 1_000_000):
                    save_model(folder, config(threshold=float(threshold)), ARRAYS)
                os._exit(0)
            time.sleep(rng.uniform(0, 0.01))
            os.kill(saver, signal.SIGKILL)
            os.waitpid(saver, 0)
            loaded, arrays, _ = read_model(folder)
            np.testing.assert_array_equal(arrays["memory_bank"], ARRAYS["memory_bank"])
    finally:
        stop.touch()
        os.waitpid(reader, 0)
    seen = json.loads(report.read_text())
    assert seen["reads"] > kills and seen["failures"] == 0, seen
    assert loaded["threshold"] > 0  # saves did complete between the kills
    save_model(folder, config(), ARRAYS)  # removes what killed saves left
    assert len(arrays_files(folder)) <= 2


# ------------------------------------------------------------ through Detector and the CLI
def _model_copy(model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    return copy


def _replace_bank(folder: Path, bank: np.ndarray) -> Path:
    loaded, arrays, path = read_model(folder)
    save_file({**arrays, "memory_bank": bank}, str(path))
    return path


@pytest.mark.parametrize(
    "bank, problem",
    [
        (np.ones(16, dtype=np.float32), "shape"),
        (np.ones((0, 8), dtype=np.float32), "shape"),
        (np.ones((4, 7), dtype=np.float32), "7-dim features"),
    ],
    ids=["one-dimensional", "empty", "wrong width"],
)
def test_a_memory_bank_that_cannot_fit_the_backbone_is_refused_at_load(
    model: Path, tmp_path: Path, bank: np.ndarray, problem: str
) -> None:
    folder = _model_copy(model, tmp_path)
    path = _replace_bank(folder, bank)
    with pytest.raises(ModelFileError, match=problem) as caught:
        Detector.load(folder)
    assert str(path) in str(caught.value)


def test_a_damaged_model_makes_predict_exit_2_naming_the_file(
    model: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _model_copy(model, tmp_path)
    path = _corrupt_arrays(folder, "truncated")
    image = next((dataset / "test" / "good").iterdir())
    assert main(["predict", str(folder), str(image), "-o", str(tmp_path / "out")]) == 2
    assert str(path) in capsys.readouterr().err
