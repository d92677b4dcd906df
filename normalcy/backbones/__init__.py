"""Frozen feature extractors behind one small interface.

A `Backbone` takes RGB uint8 images and returns patch-feature grids, one per requested layer;
`aggregate` turns those into one L2-comparable feature grid per image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from normalcy.backbones.dinov2 import VIT_CONFIGS, build_dinov2
from normalcy.backbones.efficientnet import build_efficientnet
from normalcy.backbones.grids import (
    aggregate,
    half_stride_views,
    interleave,
    network_input,
    with_context,
)
from normalcy.backbones.memo import ForwardMemo
from normalcy.backbones.tiles import TILE_MARGIN, stitch, tile_origins, tiled_size
from normalcy.backbones.weights import WeightsNotFoundError

__all__ = [
    "PRECISION_ENV",
    "BACKBONES",
    "PRECISIONS",
    "Backbone",
    "WeightsNotFoundError",
    "aggregate",
    "create_backbone",
    "default_layers",
    "input_stride",
    "resolve_device",
    "resolve_precision",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# "auto": bfloat16 where the device multiplies it in hardware, else float32.
PRECISIONS = ("auto", "float32", "bfloat16")
# Names the arithmetic that "auto" means on every device of this process and its workers: one
# precision across a fleet of mixed CPUs, or the other arithmetic path checked by the tests.
PRECISION_ENV = "NORMALCY_PRECISION"
DEVICES = ("auto", "cpu", "cuda", "mps")
# The backbone input's long side is at most this many times `image_size`: it bounds the cost of
# an image, whatever its aspect ratio.
MAX_ASPECT = 8
# The largest input short side: above it one image's attention and feature maps take
# gigabytes (inspect finer detail by tiling instead).
MAX_IMAGE_SIZE = 2048


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (x86 AVX512-BF16 or AMX-BF16);
    without them bfloat16 is emulated and slower than float32."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """The arithmetic to run, "float32" or "bfloat16", for a requested precision; "auto"
    is decided for the device: bfloat16 on CPUs with bfloat16 instructions and on CUDA
    devices that support it, float32 elsewhere, unless $NORMALCY_PRECISION names one."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    chosen = os.environ.get(PRECISION_ENV, "auto").strip() or "auto"
    if chosen not in PRECISIONS:
        raise ValueError(f"${PRECISION_ENV} must be one of {PRECISIONS}, got {chosen!r}")
    if chosen != "auto":
        return chosen
    kind = torch.device(device).type
    if kind == "cpu":
        return "bfloat16" if native_bfloat16() else "float32"
    if kind == "cuda":
        # Only where bfloat16 runs in hardware (Ampere and later), not emulated.
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 does not emulate, nor take the argument
            native = torch.cuda.is_bf16_supported()
        return "bfloat16" if native else "float32"
    return "float32"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a requested one: "auto" takes CUDA, then Apple's MPS, then the
    CPU; a device that is named but absent is refused with the reason."""
    name = str(device)
    kind = name.split(":")[0]
    if kind not in DEVICES or (":" in name and kind in ("auto", "cpu")):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {name!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device cuda was asked for, but this torch sees no CUDA device "
            f"(torch {torch.__version__}); use --device cpu or a CUDA build of torch"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for, but this machine has no usable MPS device")
    return torch.device(name)


class Backbone(nn.Module):
    """A frozen network plus its preprocessing: uint8 RGB images in, feature grids out.

    Images are resized so the short side is `image_size` (aspect ratio kept), each side
    rounded to a multiple of `stride`. precision "bfloat16" runs the network's matrix
    products in bfloat16 (features come out as float32): on CPUs with bfloat16 instructions
    the forward pass takes about 0.6 to 0.75 of the float32 time.
    """

    def __init__(
        self,
        name: str,
        network: nn.Module,
        stride: int,
        image_size: int,
        pool: int,
        layers: tuple[int, ...],
        context: float = 0.0,
        precision: str = "float32",
        channels_last: bool = False,
        tile_scale: float | None = None,
    ) -> None:
        super().__init__()
        if tile_scale is not None and tile_scale <= 0:
            raise ValueError(f"tile_scale must be positive or None, got {tile_scale}")
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
        if not stride <= image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be from {stride} to {MAX_IMAGE_SIZE} for {name}, got {image_size}"
            )
        self.name = name
        self.network = network.eval().requires_grad_(False)
        # Convolutional networks run faster on channels-last tensors (EfficientNet-Lite0 at
        # 224 px, batch 8: 0.78x the float32 time, 0.78x in bfloat16); a ViT has no use for it.
        self.channels_last = channels_last
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.stride = stride
        self.image_size = image_size
        self.pool = pool
        self.layers = layers
        self.context = context
        self.precision = precision
        self.tile_scale = tile_scale
        # Outputs of inputs seen before, by content (see `memo`); None computes every pass.
        self.memo: ForwardMemo | None = None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (height, width) for an image of the given size: the short side at
        `image_size`, unless the long side would then pass `MAX_ASPECT` times that, in which
        case the long side is held there (so a 5 x 40000 strip costs what a 224 x 1792 input
        does, not 224 x 1.8 million)."""
        scale = min(
            self.image_size / min(height, width), MAX_ASPECT * self.image_size / max(height, width)
        )
        return tuple(  # type: ignore[return-value]
            max(self.stride, round(side * scale / self.stride) * self.stride)
            for side in (height, width)
        )

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @cached_property
    def _grid_shape(self) -> tuple[int, int]:
        """(channels C of the (h, w, C) feature grids, pixels per grid cell: the finest
        layer's stride), from one pass of a small blank input."""
        side = max(64, 8 * self.stride)
        blank = torch.zeros(1, 3, side, side, device=self.device)
        grid = aggregate(self(blank), self.pool, self.context)
        return int(grid.shape[1]), side // grid.shape[-2]

    def feature_dims(self) -> int:
        """Channels C of the (h, w, C) feature grids."""
        return self._grid_shape[0]

    @property
    def decode_side(self) -> int | None:
        """The short side images may be decoded reduced to (None: full size, for tiles)."""
        return None if self.tile_scale is not None else self.image_size

    def preprocess(self, image: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(3, H, W) float tensor in [0, 1] on the backbone's device, resized to `size` (by
        default the network input size); the uint8 image crosses to the device first."""
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # torch refuses to share read-only memory
            image = image.copy()
        pixels = torch.from_numpy(image).to(self.device, non_blocking=True)
        return network_input(pixels, size or self.input_size(*image.shape[:2]))

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Feature grids (B, C_l, h_l, w_l) of each layer for a (B, 3, H, W) batch in [0, 1];
        with a `memo`, inputs it holds are not run again."""
        if self.memo is None:
            return self._run(batch)
        identity = (self.name, self.precision, str(self.device))
        keys = [(identity, ForwardMemo.digest(item)) for item in batch]
        layers = sorted(self.layers)
        found = [[self.memo.get((*key, layer)) for layer in layers] for key in keys]
        missing = [i for i, outputs in enumerate(found) if any(o is None for o in outputs)]
        if missing:
            computed = self._run(batch[missing])
            for row, i in enumerate(missing):
                found[i] = [maps[row] for maps in computed]
                for layer, output in zip(layers, found[i], strict=True):
                    self.memo.put((*keys[i], layer), output)
        return [torch.stack([outputs[j] for outputs in found]) for j in range(len(layers))]

    def _run(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """The network's pass: one grid per layer, in float32."""
        bfloat16 = self.precision == "bfloat16"
        normalised = (batch - self.mean) / self.std
        if self.channels_last:
            normalised = normalised.contiguous(memory_format=torch.channels_last)
        with torch.autocast(batch.device.type, torch.bfloat16, enabled=bfloat16):
            maps = self.network(normalised)
        return [grid.float() for grid in maps]

    @torch.inference_mode()
    def features(
        self, images: list[np.ndarray], dense: bool = False, batch_size: int | None = None
    ) -> list[torch.Tensor]:
        """One (h, w, C) float32 feature grid per uint8 RGB image, on the backbone's device;
        images of the same input size share forward passes of at most `batch_size` images
        (None: all of them), so a list of mixed sizes is batched by size (bucketing).

        dense: also run the image shifted by half a stride down, right and both, and
        interleave the four grids into one (2h - 1, 2w - 1) grid at half the stride; its
        even rows and columns are the plain grid. The image context of every patch is taken
        from the plain grid's median patch.

        With `tile_scale`, each image is tiled instead (see `tiles`): one grid of the whole
        image at that scale of its own resolution, from tiles of `image_size` px.
        """
        if self.tile_scale is not None:
            if dense:
                raise ValueError("the dense map is not available with tiles")
            return [
                self.image_grid(
                    self.preprocess(image, self.network_size(*image.shape[:2])), batch_size
                )
                for image in images
            ]
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(self.input_size(*image.shape[:2]), []).append(index)
        chunks = [
            group[start : start + (batch_size or len(group))]
            for group in groups.values()
            for start in range(0, len(group), batch_size or len(group))
        ]
        for indices in chunks:
            batch = torch.stack([self.preprocess(images[i]) for i in indices])
            views = half_stride_views(batch, self.stride // 2) if dense else batch
            grids = aggregate(self(views), self.pool, self.context, len(views) // len(batch))
            if dense:
                grids = interleave(grids)
            for i, grid in zip(indices, grids.permute(0, 2, 3, 1), strict=True):
                out[i] = grid.contiguous()
        return out  # type: ignore[return-value]

    @property
    def _tile(self) -> int:
        """Pixels across a tile: `image_size` down to a multiple of the stride, so tiles line
        up with one grid over the image."""
        return self.image_size // self.stride * self.stride

    @property
    def tile_cells(self) -> int | None:
        """Grid cells across one tile (None when the whole image is one backbone input)."""
        return None if self.tile_scale is None else self._tile // self._cell()

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of `height` x `width` reaches the network at: `input_size`, or
        with `tile_scale` the size it is cut into tiles at."""
        if self.tile_scale is None:
            return self.input_size(height, width)
        margin = TILE_MARGIN * self._cell()
        return tiled_size(height, width, self.tile_scale, self._tile, self.stride, margin)

    def image_grid(self, pixels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The (h, w, C) grid of one image's (3, H, W) pixels at its `network_size`: one pass,
        or with `tile_scale` its tiles' grids (up to `batch_size` tiles a pass) stitched."""
        if self.tile_scale is None:
            return aggregate(self(pixels[None]), self.pool, self.context)[0].permute(1, 2, 0)
        tile = self._tile
        margin = TILE_MARGIN * self._cell()
        size = tuple(pixels.shape[-2:])
        rows = tile_origins(size[0], tile, self.stride, margin)
        columns = tile_origins(size[1], tile, self.stride, margin)
        crops = [pixels[:, y : y + tile, x : x + tile] for y in rows for x in columns]
        step = batch_size or len(crops)
        grids = torch.cat(
            [
                aggregate(self(torch.stack(crops[i : i + step])), self.pool)
                for i in range(0, len(crops), step)
            ]
        ).permute(0, 2, 3, 1)
        stitched = stitch(grids, rows, columns, size, self._cell())
        return with_context(stitched.permute(2, 0, 1)[None], self.context)[0].permute(1, 2, 0)

    def _cell(self) -> int:
        """Pixels per cell of the feature grid (the finest layer's stride)."""
        return self._grid_shape[1]


class BackboneSpec(NamedTuple):
    """How to build a backbone, and what a setting needs to know of it before it is built."""

    build: Callable  # (name, layers, weights) -> (network, channels_last)
    layers: tuple[int, ...]  # the blocks used by default
    pool: int  # neighbourhood averaged into each patch feature
    stride: int  # input sides are multiples of it: the smallest image_size


BACKBONES: dict[str, BackboneSpec] = {
    **{
        name: BackboneSpec(
            build_dinov2, (6,) if "vitl" not in name else (12,), 1, VIT_CONFIGS[name].patch_size
        )
        for name in (
            "dinov2_vits14",
            "dinov2_vitb14",
            "dinov2_vitl14",
            "dinov2_vits14_reg",
            "dinov2_vitb14_reg",
            "dinov2_vitl14_reg",
        )
    },
    # Ends of stage 3 (stride 8) and stage 5 (stride 16), the PatchCore "mid-level" choice;
    # inputs are multiples of the deepest stride, so "same" padding stays symmetric.
    "efficientnet_lite0": BackboneSpec(build_efficientnet, (4, 10), 3, 16),
}


def default_layers(name: str) -> tuple[int, ...]:
    return _lookup(name).layers


def input_stride(name: str) -> int:
    """The backbone's input stride: sides are multiples of it, and image_size at least it."""
    return _lookup(name).stride


def _lookup(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def create_backbone(
    name: str,
    image_size: int,
    layers: tuple[int, ...] | None = None,
    pool: int | None = None,
    weights: str | os.PathLike | None = None,
    context: float = 0.0,
    precision: str = "float32",
    device: str | torch.device = "cpu",
    tile_scale: float | None = None,
) -> Backbone:
    """A ready, frozen backbone on `device` (see `resolve_device`); weights resolved as
    described in `weights.py`; precision may be "auto" (see `resolve_precision`)."""
    spec = _lookup(name)
    layers = tuple(layers) if layers else spec.layers
    device = resolve_device(device)
    network, channels_last = spec.build(name, layers, weights)
    pool = spec.pool if pool is None else pool
    arithmetic = resolve_precision(precision, device)
    return Backbone(
        name,
        network,
        spec.stride,
        image_size,
        pool,
        layers,
        context,
        arithmetic,
        channels_last,
        tile_scale,
    ).to(device)
