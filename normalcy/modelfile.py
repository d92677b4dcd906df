"""A model on disk: a folder holding `config.json` and the fitted arrays in safetensors.

Saving never leaves the folder absent or half-written, whatever moment a process is killed at:
the arrays go to a new file of their own (`method-<id>.safetensors`), then `config.json`, which
names that file, is replaced in one atomic rename. A reader sees the old model or the new one,
never a mix; the arrays of the model before stay until the next save, so a reader that read the
old config still finds them, and it re-reads the config if two saves overtook it. Leftovers of
a killed save are removed by the next one. Saves to one folder take turns (an advisory lock on
the folder). A folder holding anything else than a model is refused, never emptied.

Loading validates everything before it is used: the config's keys, types and ranges, and every
array's dtype, values and shape; each problem is a `ModelFileError` naming the file. Nothing is
unpickled: safetensors holds plain arrays.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as dump_arrays

from normalcy.selection import Selection
from normalcy.setting import Setting

try:
    import fcntl
except ImportError:  # Windows: saves to one folder are not serialised there
    fcntl = None  # type: ignore[assignment]

MODEL_FORMAT = "normalcy-model"
# 3: the setting is one object ("setting"); 2: its fields were spread over "backbone",
# "method" and the top level, and the arrays file is named in config.json ("arrays"); 1: it
# was always method.safetensors.
MODEL_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG = "config.json"
LEGACY_ARRAYS = "method.safetensors"
MAX_CONFIG_BYTES = 1 << 20
_REQUIRED = object()  # a config key with no default: models have always held it
_ARRAYS_NAME = re.compile(r"method-[0-9a-f]{16}\.safetensors")
_CONFIG_TEMPORARY = re.compile(r"\.config\.json\.tmp-[0-9a-f]{16}")
READ_ATTEMPTS = 3  # a reader overtaken by this many saves in a row gives up


class ModelFileError(ValueError):
    """A model file is missing, unreadable or invalid; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fsdecode(path)}: {problem}")
        self.path = os.fsdecode(path)
        self.problem = problem


# ------------------------------------------------------------------------------------ save
def save_model(folder: str | os.PathLike, config: dict[str, Any], arrays: dict) -> Path:
    """Write `config` and `arrays` as the model in `folder` (created if absent), atomically."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a symbolic link to no folder; refusing to save there")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)  # a symlink to a folder is followed, kept
    with _exclusive(folder):
        foreign = sorted(name for name in os.listdir(folder) if not _is_model_file(name))
        if foreign or not _holds_no_other_config(folder):
            shown = ", ".join(foreign[:5]) or CONFIG
            raise FileExistsError(
                f"{folder} holds files that are not part of a normalcy model ({shown}); "
                "refusing to write a model there. Choose an empty or new folder."
            )
        previous = _arrays_named(folder)
        token = secrets.token_hex(8)
        arrays_name = f"method-{token}.safetensors"
        _write_new(folder / arrays_name, dump_arrays(arrays))
        staged = folder / f".config.json.tmp-{token}"
        text = json.dumps({**config, "arrays": arrays_name}, indent=2) + "\n"
        _write_new(staged, text.encode())
        os.replace(staged, folder / CONFIG)
        _sync_folder(folder)
        for name in os.listdir(folder):
            if name not in (CONFIG, arrays_name, previous):
                (folder / name).unlink(missing_ok=True)
    _remove_legacy_leftovers(folder)
    return folder


def is_model_folder(folder: Path) -> bool:
    """An empty folder or one holding only a normalcy model's files (may be saved over)."""
    if not folder.is_dir():
        return False
    return all(_is_model_file(name) for name in os.listdir(folder)) and _holds_no_other_config(
        folder
    )


def _is_model_file(name: str) -> bool:
    return (
        name in (CONFIG, LEGACY_ARRAYS)
        or bool(_ARRAYS_NAME.fullmatch(name))
        or bool(_CONFIG_TEMPORARY.fullmatch(name))
    )


def _holds_no_other_config(folder: Path) -> bool:
    """No config.json, or a normalcy one (a killed first save may leave none)."""
    try:
        return _config_of(folder).get("format") == MODEL_FORMAT
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False


def _arrays_named(folder: Path) -> str | None:
    """The arrays file the folder's current config.json names, if it has one."""
    try:
        name = _config_of(folder).get("arrays", LEGACY_ARRAYS)
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _config_of(folder: Path) -> dict:
    return json.loads((folder / CONFIG).read_text())


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (modes from the umask) with `data`, flushed to the disk."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Saves to `folder` take turns: an advisory lock on the folder itself."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _remove_legacy_leftovers(folder: Path) -> None:
    """Staging and old-copy folders beside `folder` that saves before format 2 left behind
    when killed (`.NAME.tmp-*`, `.NAME.old-PID`), when they hold model files only."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(tmp-.+|old-\d+)")
    with contextlib.suppress(OSError):
        for entry in folder.parent.iterdir():
            if pattern.fullmatch(entry.name) and is_model_folder(entry):
                shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------------ load
def read_model(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    """The validated config (defaults filled in for keys older models lack), the arrays and
    the path of the arrays file, of the model in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "no such folder" if not folder.exists() else "not a folder"
        raise ModelFileError(folder, f"{problem}; a model is a folder with a config.json")
    attempts = READ_ATTEMPTS
    while True:
        config = read_config(folder)
        path = folder / config["arrays"]
        try:
            return config, _read_arrays(path), path
        except FileNotFoundError:
            attempts -= 1  # removed by a save after the config was read: read it again
            if not attempts:
                raise ModelFileError(path, "the arrays file config.json names is missing") from None


def read_config(folder: Path) -> dict[str, Any]:
    """`folder`'s config.json, checked against the schema, with defaults filled in."""
    path = folder / CONFIG
    try:
        raw = _read_regular(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ModelFileError(folder, "not a normalcy model: no config.json in it") from None
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(path, f"not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ModelFileError(path, "not a normalcy model config")
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(
            path,
            f"saved by normalcy {config.get('normalcy_version')} in model format {version}; "
            f"this normalcy reads format {MODEL_FORMAT_VERSION} (and older: "
            f"{', '.join(map(str, READABLE_VERSIONS))}). Use a matching normalcy or fit again.",
        )
    if version == 1:
        config.setdefault("arrays", LEGACY_ARRAYS)
    if version in (1, 2):
        _upgrade_setting(config, path)
    return _checked(config, path)


# Fields of the setting in formats 1 and 2: (where they were, the value models saved before
# the field existed were fitted with).
_LEGACY_SETTING: dict[str, tuple[tuple[str, ...], Any]] = {
    "backbone": (("backbone", "name"), _REQUIRED),
    "image_size": (("backbone", "image_size"), _REQUIRED),
    "layers": (("backbone", "layers"), _REQUIRED),
    "context": (("backbone", "context"), 0.0),
    "tile_scale": (("backbone", "tile_scale"), None),
    "method": (("method", "name"), _REQUIRED),
    "coreset_ratio": (("method", "params", "coreset_ratio"), 0.1),
    "max_bank_size": (("method", "params", "max_bank_size"), 10_000),
    "low_variance_fraction": (("method", "params", "low_variance_fraction"), None),
    "closing": (("closing",), 1),
    "sigma": (("sigma",), _REQUIRED),
    "upsample": (("upsample",), "bilinear"),
}


def _upgrade_setting(config: dict[str, Any], path: Path) -> None:
    """Gather a format 1 or 2 config's setting fields into "setting", as format 3 holds them
    (the old keys stay, unread)."""
    setting = {}
    for field, (keys, default) in _LEGACY_SETTING.items():
        parent = config
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and keys[-1] in parent:
            setting[field] = parent[keys[-1]]
        elif default is _REQUIRED:
            raise ModelFileError(path, f"{'.'.join(keys)!r} is missing")
        else:
            setting[field] = default
    config["setting"] = setting


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (of at most `limit` bytes); a FIFO, device or folder in
    its place is refused without a blocking read."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(path, "not a regular file")
        if limit is not None and info.st_size > limit:
            raise ModelFileError(path, f"{info.st_size} bytes, more than the {limit} allowed")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(descriptor)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file: floating point, finite."""
    raw = _read_regular(path)
    try:
        arrays = load_arrays(raw)
    except (SafetensorError, ValueError, TypeError) as error:
        raise ModelFileError(path, f"not a readable safetensors file ({error})") from None
    for key, array in arrays.items():
        if array.dtype.kind != "f":
            raise ModelFileError(path, f"array {key!r} is {array.dtype}, not floating point")
        if not np.isfinite(array).all():
            raise ModelFileError(path, f"array {key!r} holds NaN or infinite values")
    return arrays


# ---------------------------------------------------------------------------- the schema
Check = Callable[[Any], bool]


def _integer(low: int, high: int | None = None) -> Check:
    return lambda v: (
        isinstance(v, int) and not isinstance(v, bool) and low <= v and (high is None or v <= high)
    )


def _number(low: float, high: float | None = None, below: float | None = None) -> Check:
    return lambda v: (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and low <= v
        and (high is None or v <= high)
        and (below is None or v < below)
    )


def _one_of(*choices: Any) -> Check:
    return lambda v: v in choices


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _is(kind: type) -> Check:
    return lambda v: isinstance(v, kind)


def _size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_integer(1)(v) for v in value)


# key path -> (check, what it must be, default for models saved before the key existed)
SCHEMA: dict[tuple[str, ...], tuple[Check, str, Any]] = {
    ("arrays",): (
        lambda v: isinstance(v, str) and (v == LEGACY_ARRAYS or bool(_ARRAYS_NAME.fullmatch(v))),
        "the name of an arrays file in the model folder",
        _REQUIRED,
    ),
    ("setting",): (_is(dict), "an object", _REQUIRED),
    # Saved before the setting could be chosen, or given: none.
    ("selection",): (_optional(_is(dict)), "null or an object", None),
    ("backbone",): (_is(dict), "an object", _REQUIRED),
    ("backbone", "pool"): (_integer(1, 15), "an integer from 1 to 15", _REQUIRED),
    # Saved before the option existed: fitted in float32, so scores stay the same.
    ("backbone", "precision"): (
        _one_of("auto", "float32", "bfloat16"),
        "auto, float32 or bfloat16",
        "float32",
    ),
    ("backbone", "weights_fingerprint"): (_is(str), "a string", _REQUIRED),
    ("method",): (_is(dict), "an object", _REQUIRED),
    ("method", "params"): (_is(dict), "an object", _REQUIRED),
    ("shots",): (_optional(_integer(1)), "null or a positive integer", _REQUIRED),
    ("augment",): (_is(bool), "true or false", _REQUIRED),
    ("fpr",): (_number(0, below=1), "a number in [0, 1)", _REQUIRED),
    ("dense_map",): (_is(bool), "true or false", False),
    ("threshold",): (_optional(_number(-math.inf)), "null or a finite number", _REQUIRED),
    ("threshold_source",): (_optional(_is(str)), "null or a string", _REQUIRED),
    ("pixel_threshold",): (_optional(_number(-math.inf)), "null or a finite number", _REQUIRED),
    ("dense_pixel_threshold",): (
        _optional(_number(-math.inf)),
        "null or a finite number",
        None,
    ),
    ("n_train",): (_integer(0), "a non-negative integer", _REQUIRED),
    # The network input size of most training images (the default size of an export);
    # saved before it was recorded: unknown.
    ("input_size",): (_optional(_size), "null or [height, width]", None),
    # Saved before calibration was recorded: unknown.
    ("calibration",): (_optional(_is(dict)), "null or an object", None),
}


def _checked(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """`config` with every SCHEMA key checked (parents before children) and defaults set."""
    if "dense_pixel_threshold" not in config and config.get("dense_map") is True:
        # Saved before it had its own: a model fitted with the dense map set its one level.
        config["dense_pixel_threshold"] = config.get("pixel_threshold")
    for keys, (check, expected, default) in SCHEMA.items():
        parent = config
        for key in keys[:-1]:
            parent = parent[key]
        name = ".".join(keys)
        if keys[-1] not in parent:
            if default is _REQUIRED:
                raise ModelFileError(path, f"{name!r} is missing")
            parent[keys[-1]] = default
        elif not check(parent[keys[-1]]):
            raise ModelFileError(
                path, f"{name!r} must be {expected}, got {json.dumps(parent[keys[-1]])[:80]}"
            )
    for key, reader in (("setting", Setting.from_json), ("selection", Selection.from_json)):
        try:
            if config[key] is not None:
                reader(config[key])
        except (TypeError, ValueError) as error:
            raise ModelFileError(path, f"{key!r}: {error}") from None
    return config
