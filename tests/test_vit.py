"""Tests for normalcy.backbones.vit on tiny, randomly initialised transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normalcy.backbones.vit import (
    VIT_CONFIGS,
    Attention,
    VisionTransformer,
    ViTConfig,
    hf_to_meta,
    load_vit_weights,
)

TINY = ViTConfig(embed_dim=32, depth=3, num_heads=2, pos_grid=4)


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with random values (zeros would hide wrong wiring)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def _tiny(layers: tuple[int, ...] = (0, 2), config: ViTConfig = TINY) -> VisionTransformer:
    return _randomised(VisionTransformer(config, layers))  # type: ignore[return-value]


def _image(height: int, width: int, batch: int = 1) -> torch.Tensor:
    return torch.rand((batch, 3, height, width), generator=torch.Generator().manual_seed(1))


# --- shapes and structure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "grid"),
    [(56, 84, (4, 6)), (84, 56, (6, 4)), (56, 56, (4, 4)), (28, 98, (2, 7)), (60, 90, (4, 6))],
)
def test_output_grids_follow_the_input_aspect_ratio(
    height: int, width: int, grid: tuple[int, int]
) -> None:
    model = _tiny()
    with torch.no_grad():
        outputs = model(_image(height, width, batch=2))
    assert len(outputs) == 2
    for output in outputs:
        assert output.shape == (2, 32, *grid)
        assert torch.isfinite(output).all()


def test_only_blocks_up_to_the_last_requested_one_are_built() -> None:
    model = VisionTransformer(TINY, (0, 1))
    assert len(model.blocks) == 2
    assert not any(k.startswith("blocks.2.") for k in model.state_dict())
    assert len(VisionTransformer(TINY, (0,)).blocks) == 1
    assert len(VisionTransformer(TINY, (2,)).blocks) == 3


def test_layers_are_returned_in_block_order_whatever_the_request_order() -> None:
    model = _tiny((2, 0))
    assert model.layers == (0, 2)
    with torch.no_grad():
        reversed_request = model(_image(56, 56))
        in_order = _tiny((0, 2))(_image(56, 56))
    for a, b in zip(reversed_request, in_order, strict=True):
        torch.testing.assert_close(a, b)


def test_a_block_output_does_not_depend_on_later_blocks() -> None:
    deep = _tiny((0, 2))
    shallow = VisionTransformer(TINY, (0,))
    load_vit_weights(shallow, deep.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(shallow.eval()(_image(56, 84))[0], deep(_image(56, 84))[0])


@pytest.mark.parametrize("layers", [(), (3,), (0, 3), (-1,), (-1, 2)])
def test_invalid_layers_are_rejected(layers: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="0..2"):
        VisionTransformer(TINY, layers)


def test_dinov2_configs_match_the_published_sizes() -> None:
    small = VisionTransformer(VIT_CONFIGS["dinov2_vits14"], (11,))
    n_params = sum(p.numel() for p in small.parameters())
    # DINOv2 ViT-S/14 has 22,056,192 without its mask token; the final LayerNorm (768) is
    # not built because raw block outputs are returned.
    assert n_params == 22_056_192 - 2 * 384
    assert small.pos_embed.shape == (1, 1 + 37 * 37, 384)
    assert VIT_CONFIGS["dinov2_vitb14_reg"].num_registers == 4


# --- register tokens -----------------------------------------------------------------------------


def test_register_tokens_take_part_in_attention_but_not_in_the_output() -> None:
    config = ViTConfig(embed_dim=32, depth=3, num_heads=2, pos_grid=4, num_registers=4)
    model = _tiny((1,), config)
    assert model.register_tokens is not None and model.register_tokens.shape == (1, 4, 32)
    with torch.no_grad():
        (before,) = model(_image(56, 84, batch=2))
        # Not a constant shift: the first LayerNorm would remove it.
        model.register_tokens.add_(torch.randn(1, 4, 32, generator=torch.Generator()))
        (after,) = model(_image(56, 84, batch=2))
    assert before.shape == after.shape == (2, 32, 4, 6)
    assert not torch.allclose(before, after)


def test_model_without_registers_has_no_register_parameter() -> None:
    model = VisionTransformer(TINY, (0,))
    assert model.register_tokens is None
    assert "register_tokens" not in model.state_dict()


# --- internals that must match Meta's DINOv2 ----------------------------------------------------


def test_attention_matches_torch_multihead_attention_with_the_same_weights() -> None:
    attention = _randomised(Attention(32, 4))
    reference = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(attention.qkv.weight)
        reference.in_proj_bias.copy_(attention.qkv.bias)
        reference.out_proj.weight.copy_(attention.proj.weight)
        reference.out_proj.bias.copy_(attention.proj.bias)
        tokens = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
        expected, _ = reference(tokens, tokens, tokens, need_weights=False)
        torch.testing.assert_close(attention(tokens), expected, rtol=1e-4, atol=1e-5)


def test_position_grid_is_used_unchanged_at_its_trained_size() -> None:
    model = _tiny()
    torch.testing.assert_close(model._pos_embed(4, 4), model.pos_embed)


def test_position_grid_is_interpolated_row_major_for_other_sizes() -> None:
    model = VisionTransformer(TINY, (0,))
    with torch.no_grad():
        # Channel 0 grows with the column, channel 1 with the row, the rest are constant.
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        grid = torch.full((4, 4, 32), 0.5)
        grid[..., 0], grid[..., 1] = cols, rows
        model.pos_embed[0, 1:] = grid.reshape(16, 32)
        model.pos_embed[0, 0] = -3.0
        pos = model._pos_embed(3, 7)
    assert pos.shape == (1, 1 + 21, 32)
    assert torch.all(pos[0, 0] == -3.0)  # the class token's position is never interpolated
    out = pos[0, 1:].reshape(3, 7, 32)
    torch.testing.assert_close(out[..., 2:], torch.full((3, 7, 30), 0.5))
    assert torch.all(out[:, 1:, 0] > out[:, :-1, 0])  # increases along the width
    assert torch.allclose(out[1:, :, 0], out[:-1, :, 0])  # constant along the height
    assert torch.all(out[1:, :, 1] > out[:-1, :, 1])
    assert torch.allclose(out[:, 1:, 1], out[:, :-1, 1])


# --- Hugging Face naming and weight loading ------------------------------------------------------


def _to_hf(meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-named ViT weights in Hugging Face `Dinov2Model` naming (qkv split in three)."""
    hf = {
        "embeddings.cls_token": meta["cls_token"],
        "embeddings.mask_token": torch.zeros(1, meta["cls_token"].shape[-1]),
        "embeddings.position_embeddings": meta["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": meta["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": meta["patch_embed.proj.bias"],
        "layernorm.weight": torch.ones(meta["cls_token"].shape[-1]),
        "layernorm.bias": torch.zeros(meta["cls_token"].shape[-1]),
    }
    depth = 1 + max(int(k.split(".")[1]) for k in meta if k.startswith("blocks."))
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            query, key, value = meta[src + f"attn.qkv.{kind}"].chunk(3)
            hf[dst + f"attention.attention.query.{kind}"] = query
            hf[dst + f"attention.attention.key.{kind}"] = key
            hf[dst + f"attention.attention.value.{kind}"] = value
            hf[dst + f"attention.output.dense.{kind}"] = meta[src + f"attn.proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[dst + f"{name}.{kind}"] = meta[src + f"{name}.{kind}"]
        hf[dst + "layer_scale1.lambda1"] = meta[src + "ls1.gamma"]
        hf[dst + "layer_scale2.lambda1"] = meta[src + "ls2.gamma"]
    return hf


def test_hf_to_meta_concatenates_query_key_value_in_that_order() -> None:
    dim = 4
    hf = _to_hf(VisionTransformer(ViTConfig(dim, 1, 1, pos_grid=2), (0,)).state_dict())
    for part, fill in (("query", 1.0), ("key", 2.0), ("value", 3.0)):
        hf[f"encoder.layer.0.attention.attention.{part}.weight"] = torch.full((dim, dim), fill)
        hf[f"encoder.layer.0.attention.attention.{part}.bias"] = torch.full((dim,), 10 * fill)
    meta = hf_to_meta(hf)
    weight, bias = meta["blocks.0.attn.qkv.weight"], meta["blocks.0.attn.qkv.bias"]
    assert weight.shape == (3 * dim, dim) and bias.shape == (3 * dim,)
    assert weight[:dim].eq(1).all() and weight[dim : 2 * dim].eq(2).all()
    assert weight[2 * dim :].eq(3).all()
    assert bias.tolist() == [10.0] * dim + [20.0] * dim + [30.0] * dim


def test_hf_to_meta_renames_every_tensor_of_a_model() -> None:
    original = _tiny().state_dict()
    meta = hf_to_meta(_to_hf(original))
    # The HF mask token is dropped; the final norm is kept, as in Meta's checkpoints.
    assert set(meta) == set(original) | {"norm.weight", "norm.bias"}
    for name, tensor in original.items():
        assert torch.equal(meta[name], tensor), name
    model = VisionTransformer(TINY, (0, 2))
    load_vit_weights(model, meta)
    with torch.no_grad():
        for a, b in zip(model.eval()(_image(56, 84)), _tiny()(_image(56, 84)), strict=True):
            torch.testing.assert_close(a, b)


def test_load_vit_weights_ignores_blocks_the_model_does_not_build() -> None:
    full = _tiny((0, 2)).state_dict()
    shallow = VisionTransformer(TINY, (1,))
    load_vit_weights(shallow, full)
    assert torch.equal(shallow.blocks[1].mlp.fc2.weight, full["blocks.1.mlp.fc2.weight"])
    assert torch.equal(shallow.pos_embed, full["pos_embed"])


def test_load_vit_weights_rejects_missing_tensors() -> None:
    state = _tiny().state_dict()
    del state["blocks.1.attn.qkv.weight"]
    model = VisionTransformer(TINY, (0, 2))
    before = model.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight"):
        load_vit_weights(model, state)
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)  # nothing half-loaded


def test_load_vit_weights_rejects_mis_shaped_tensors() -> None:
    state = _tiny().state_dict()
    state["pos_embed"] = torch.zeros(1, 1 + 5 * 5, 32)
    with pytest.raises(ValueError, match=r"pos_embed.*\(1, 26, 32\)"):
        load_vit_weights(VisionTransformer(TINY, (0, 2)), state)
