"""A setting: everything that decides the features and the scores, as one frozen, validated,
serialisable value that `Detector`, the CLI, `config.json` and the benchmark rows all speak.

What is not in it decides neither: the arithmetic and the device (`precision`, `device`), the
threshold's target rate, batch size and seeds, how many normal images are used (`shots`), and
the dense map, which changes maps only and may be switched on a fitted model.
`SETTINGS` names the settings worth trying on a new part; `Setting.flags` gives the command
line of any setting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from normalcy.backbones import BACKBONES, MAX_IMAGE_SIZE, input_stride
from normalcy.methods import METHODS
from normalcy.methods.fused import KNNGaussianFusion
from normalcy.methods.mutual import MutualScorer
from normalcy.methods.patchknn import PatchKNN
from normalcy.postprocess import SIGMA_AT_256, UPSAMPLING

AUTO = "auto"  # chosen by `fit` from the normal images (`normalcy.selection`)
ZERO_SHOT_METHOD = MutualScorer.name  # scores a batch against itself: no fit
# The largest values a setting may hold: beyond them a fit would take hours or the option
# would do nothing more.
MAX_CONTEXT = 100
MAX_CLOSING = 15
MAX_TILE_SCALE = 16
MAX_SIGMA = 1000
# Weight of the image-context half of each patch descriptor (see `aggregate`) when a setting
# gives none: equal to the appearance half for the patch-kNN methods, off for the methods it
# was not measured with.
DEFAULT_CONTEXT = {PatchKNN.name: 1.0, KNNGaussianFusion.name: 1.0}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Setting:
    """What decides features and scores (defaults: the general-purpose setting).

    backbone, image_size, layers: the feature extractor; the image's short side is resized to
        image_size (at least the backbone's stride); layers None: the backbone's own.
    tile_scale: inspect in tiles of image_size px cut from the image resized by this factor
        (1: its own resolution), for defects a few pixels wide; None: the whole image.
    context: weight of each patch's difference from its image's median patch, appended to its
        features (0: off; None: 1 for the patch-kNN methods, 0 for the others).
    method: "patchknn", "gaussian", "patchknn+gaussian", "golden", or "mutual" (zero-shot).
    coreset_ratio, max_bank_size: the patch-kNN memory bank (share kept, largest size).
    low_variance_fraction: gaussian only: keep the principal components of smallest variance
        holding this share of it; None keeps all.
    closing: width in patches of the grey closing that fills broad defects' insides (1: off).
    sigma: Gaussian smoothing of maps in pixels at a 256 px short side (0: off).
    upsample: "bicubic" or "bilinear", how patch scores become the map users see.
    """

    backbone: str = "dinov2_vits14"
    image_size: int = 224
    tile_scale: float | None = None
    layers: tuple[int, ...] | None = None
    context: float | None = None
    method: str = "patchknn"
    coreset_ratio: float = 0.1
    max_bank_size: int = 10_000
    low_variance_fraction: float | None = None
    closing: int = 3
    sigma: float = SIGMA_AT_256
    upsample: str = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str | None:  # noqa: C901, PLR0911 - one check per field, in order
        """What is wrong with this setting, in words, or None."""
        if self.backbone not in BACKBONES:
            return f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}"
        stride = input_stride(self.backbone)
        if not _is_integer(self.image_size) or not stride <= self.image_size <= MAX_IMAGE_SIZE:
            return (
                f"image_size must be an integer from {stride} to {MAX_IMAGE_SIZE} for "
                f"{self.backbone}, got {self.image_size!r}"
            )
        if self.tile_scale is not None and not (
            _is_number(self.tile_scale) and 0 < self.tile_scale <= MAX_TILE_SCALE
        ):
            return f"tile_scale must be in (0, {MAX_TILE_SCALE}] or None, got {self.tile_scale!r}"
        if self.layers is not None and not (
            isinstance(self.layers, tuple)
            and self.layers
            and all(_is_integer(layer) and layer >= 0 for layer in self.layers)
        ):
            return f"layers must be a non-empty list of block numbers or None, got {self.layers!r}"
        if self.context is not None and not (
            _is_number(self.context) and 0 <= self.context <= MAX_CONTEXT
        ):
            return f"context must be from 0 to {MAX_CONTEXT} or None, got {self.context!r}"
        if self.method not in (*METHODS, ZERO_SHOT_METHOD):
            return (
                f"unknown method {self.method!r}; choose one of "
                f"{sorted((*METHODS, ZERO_SHOT_METHOD))}"
            )
        if not (_is_number(self.coreset_ratio) and 0 < self.coreset_ratio <= 1):
            return f"coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}"
        if not (_is_integer(self.max_bank_size) and self.max_bank_size >= 1):
            return f"max_bank_size must be a positive integer, got {self.max_bank_size!r}"
        if self.low_variance_fraction is not None:
            if self.method != "gaussian":
                return (
                    "low_variance_fraction is an option of the gaussian method, "
                    f"not {self.method!r}"
                )
            if not (_is_number(self.low_variance_fraction) and 0 < self.low_variance_fraction <= 1):
                return (
                    f"low_variance_fraction must be in (0, 1], got {self.low_variance_fraction!r}"
                )
        if not (_is_integer(self.closing) and 1 <= self.closing <= MAX_CLOSING):
            return (
                f"closing must be at least 1 patch (1 = off), at most {MAX_CLOSING}, "
                f"got {self.closing!r}"
            )
        if not (_is_number(self.sigma) and 0 <= self.sigma <= MAX_SIGMA):
            return f"sigma must be from 0 to {MAX_SIGMA} pixels, got {self.sigma!r}"
        if self.upsample not in UPSAMPLING:
            return f"upsample must be one of {UPSAMPLING}, got {self.upsample!r}"
        return None

    @property
    def context_weight(self) -> float:
        """The context weight in use: `context`, else the method's default."""
        return DEFAULT_CONTEXT.get(self.method, 0.0) if self.context is None else self.context

    def replace(self, **changes: Any) -> Setting:
        """This setting with `changes` (field names as in the constructor), validated."""
        unknown = set(changes) - FIELDS
        if unknown:
            raise TypeError(
                f"not a setting: {', '.join(sorted(unknown))}; its fields: {FIELD_LIST}"
            )
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, every field (`from_json` reads it back)."""
        data = dataclasses.asdict(self)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    @classmethod
    def from_json(cls, data: Any) -> Setting:
        """The setting `to_json` wrote; a missing, unknown or bad field raises a ValueError
        naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"a setting must be an object, got {type(data).__name__}")
        missing, unknown = FIELDS - set(data), set(data) - FIELDS
        if missing or unknown:
            raise ValueError(
                "setting: "
                + "; ".join(
                    f"{what} {', '.join(sorted(names))}"
                    for what, names in (("missing", missing), ("unknown", unknown))
                    if names
                )
            )
        return cls(**data)

    def flags(self) -> list[str]:
        """The `normalcy fit` options that give this setting: those unlike the default, or
        `--setting default` (without options, fit chooses its own)."""
        out: list[str] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value == field.default:
                continue
            flag = "--" + CLI_NAMES.get(field.name, field.name).replace("_", "-")
            if isinstance(value, tuple):
                out += [flag, *map(str, value)]
            else:
                out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return out or ["--setting", "default"]


FIELDS = frozenset(field.name for field in dataclasses.fields(Setting))
FIELD_LIST = ", ".join(field.name for field in dataclasses.fields(Setting))
# Command-line names that differ from the field's.
CLI_NAMES = {"low_variance_fraction": "low_variance"}

DEFAULT = Setting()
# Settings worth trying on a new part, by name (`--setting NAME`), each for a stated reason.
SETTINGS: dict[str, Setting] = {
    # DINOv2 block 6 on the whole image at 224 px: general purpose, surfaces and objects.
    "default": DEFAULT,
    # The same at twice the resolution: finer detail for about 4x the backbone time.
    "dinov2-448": Setting(image_size=448),
    # DINOv2 on 224 px tiles at the image's own resolution: small defects on large images.
    "dinov2-tiles": Setting(tile_scale=1.0),
    # EfficientNet-Lite0's stride-8 grid on tiles at twice the image's resolution, without the
    # image-context half and gap filling: defects a few pixels wide on fine structure (boards).
    "fine-detail": Setting(backbone="efficientnet_lite0", tile_scale=2.0, context=0.0, closing=1),
    # ... with the stride-16 block alone: broader responses that outline a defect's extent.
    "fine-detail-outline": Setting(
        backbone="efficientnet_lite0", tile_scale=2.0, context=0.0, closing=1, layers=(10,)
    ),
}


def named_setting(name: str) -> Setting:
    """A setting of `SETTINGS` by name; an unknown name is refused with the choices."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose one of {sorted(SETTINGS)}")
    return SETTINGS[name]


def describe(setting: Setting) -> str:
    """A setting's name in `SETTINGS` where it is one, else the options that give it."""
    names = [name for name, named in SETTINGS.items() if named == setting]
    return names[0] if names else " ".join(setting.flags())


def resolve_setting(setting: str | Setting, changes: dict[str, Any]) -> Setting | str:
    """`setting` (a `Setting`, a name in `SETTINGS`, or `AUTO`) with `changes` to its fields;
    `AUTO` stays itself unless a change pins a setting (the default, changed)."""
    if setting == AUTO:
        return DEFAULT.replace(**changes) if changes else AUTO
    base = named_setting(setting) if isinstance(setting, str) else setting
    if not isinstance(base, Setting):
        raise TypeError(f"setting must be a Setting or a name, got {type(setting).__name__}")
    return base.replace(**changes) if changes else base
