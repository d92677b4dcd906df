"""DINOv2 vision transformer in plain torch, in Meta's parameter naming.

Returns the patch tokens of chosen blocks as feature grids. Position embeddings are
interpolated for any input size, so images keep their aspect ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    num_registers: int = 0
    pos_grid: int = 37  # the trained position grid (518 / 14)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINOv2 ViT; `forward` returns (B, C, h, w) grids of the requested blocks' patch tokens.

    Only the blocks up to the deepest requested one are built and run.
    """

    def __init__(self, config: ViTConfig, layers: tuple[int, ...]) -> None:
        super().__init__()
        if not layers or min(layers) < 0 or max(layers) >= config.depth:
            raise ValueError(f"layers must be block indices in 0..{config.depth - 1}, got {layers}")
        self.config = config
        self.layers = tuple(sorted(layers))
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_registers, dim))
            if config.num_registers
            else None
        )
        # Blocks after the last requested one are never run, so they are not built.
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads) for _ in range(self.layers[-1] + 1)
        )

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.config.pos_grid
        if (h, w) != (g, g):
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, grid], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, height, width = x.shape
        p = self.config.patch_size
        h, w = height // p, width // p
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(h, w)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        skip = 1 + self.config.num_registers
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in self.layers:
                # Raw block outputs: the final LayerNorm was trained for the last block only.
                outputs.append(tokens[:, skip:].transpose(1, 2).reshape(b, -1, h, w))
        return outputs


VIT_CONFIGS: dict[str, ViTConfig] = {
    "dinov2_vits14": ViTConfig(384, 12, 6),
    "dinov2_vitb14": ViTConfig(768, 12, 12),
    "dinov2_vitl14": ViTConfig(1024, 24, 16),
    "dinov2_vits14_reg": ViTConfig(384, 12, 6, num_registers=4),
    "dinov2_vitb14_reg": ViTConfig(768, 12, 12, num_registers=4),
    "dinov2_vitl14_reg": ViTConfig(1024, 24, 16, num_registers=4),
}


def hf_to_meta(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face `Dinov2Model` state dict (prefix stripped) to Meta's naming."""
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [hf[att + f"{part}.{kind}"] for part in ("query", "key", "value")]
            )
            for a, b in (
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("attention.output.dense", "attn.proj"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[dst + f"{b}.{kind}"] = hf[src + f"{a}.{kind}"]
        out[dst + "ls1.gamma"] = hf[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = hf[src + "layer_scale2.lambda1"]
    return out


def load_vit_weights(model: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    """Load Meta-named weights, ignoring blocks the model does not build; strict otherwise."""
    kept = {k: v for k, v in state.items() if k in model.state_dict()}
    missing = sorted(set(model.state_dict()) - set(kept))
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    for key, value in kept.items():
        expected = model.state_dict()[key].shape
        if value.shape != expected:
            raise ValueError(f"weight {key} has shape {tuple(value.shape)}, expected {expected}")
    model.load_state_dict(kept)
