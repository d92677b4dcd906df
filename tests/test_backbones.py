"""Tests for normalcy.backbones: sizing, preprocessing, feature grids and layer aggregation.

Real features come from EfficientNet-Lite0 at small sizes (its weights ship with a dependency).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import assert_close
from torch import nn

from normalcy.backbones import (
    BACKBONES,
    MAX_ASPECT,
    MAX_IMAGE_SIZE,
    PRECISION_ENV,
    Backbone,
    create_backbone,
    default_layers,
    native_bfloat16,
    resolve_device,
    resolve_precision,
)
from normalcy.backbones.grids import aggregate, half_stride_views, interleave, lower_median


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0", 64)


class _Pyramid(nn.Module):
    """A stand-in network: the input averaged over 8x8 and 16x16 cells (3 channels each)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [nn.functional.avg_pool2d(x, 8), nn.functional.avg_pool2d(x, 16)]


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- input size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((64, 64), (64, 64)),
        ((80, 96), (64, 80)),  # 96 * 0.8 = 76.8 -> nearest multiple of 16 is 80
        ((96, 80), (80, 64)),
        ((480, 640), (64, 80)),  # 85.3 -> 80
        ((100, 300), (64, 192)),
        ((32, 32), (64, 64)),  # small images are scaled up to the requested short side
    ],
)
def test_input_size_scales_the_short_side_and_rounds_to_the_stride(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    backbone = Backbone("fake", _Pyramid(), stride=16, image_size=64, pool=1, layers=(0, 1))
    assert backbone.input_size(*size) == expected


def test_input_size_keeps_the_aspect_ratio_within_half_a_stride() -> None:
    stride, image_size = 14, 224
    backbone = Backbone("fake", _Pyramid(), stride, image_size, pool=1, layers=(0,))
    rng = np.random.default_rng(0)
    for height, width in rng.integers(20, 3000, (200, 2)):
        out_h, out_w = backbone.input_size(int(height), int(width))
        assert out_h % stride == 0 and out_w % stride == 0
        # the short side at image_size, the long side held at MAX_ASPECT times it
        scale = min(image_size / min(height, width), MAX_ASPECT * image_size / max(height, width))
        assert abs(out_h - height * scale) <= stride / 2
        assert abs(out_w - width * scale) <= stride / 2


@pytest.mark.parametrize("image_size", [8, MAX_IMAGE_SIZE + 1])
def test_an_image_size_below_the_stride_or_above_the_maximum_is_rejected(image_size: int) -> None:
    with pytest.raises(ValueError, match=f"from 16 to {MAX_IMAGE_SIZE}"):
        Backbone("fake", _Pyramid(), stride=16, image_size=image_size, pool=1, layers=(0,))


# --- preprocessing -------------------------------------------------------------------------------


def test_preprocess_gives_a_float_chw_tensor_in_unit_range(lite0: Backbone) -> None:
    tensor = lite0.preprocess(_image(80, 96))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 64, 80)
    assert tensor.min() >= 0 and tensor.max() <= 1
    assert tensor.max() > 0.9 and tensor.min() < 0.1  # the range is used, not squashed


def test_preprocess_maps_uint8_levels_to_fractions_and_keeps_channels(lite0: Backbone) -> None:
    image = np.zeros((70, 70, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 51, 0
    tensor = lite0.preprocess(image)
    assert tensor.shape == (3, 64, 64)
    torch.testing.assert_close(tensor[0], torch.ones(64, 64))
    torch.testing.assert_close(tensor[1], torch.full((64, 64), 0.2))
    torch.testing.assert_close(tensor[2], torch.zeros(64, 64))


def test_backbone_is_frozen_and_in_eval_mode(lite0: Backbone) -> None:
    assert not lite0.network.training
    assert not any(p.requires_grad for p in lite0.parameters())


# --- feature grids -------------------------------------------------------------------------------


def test_features_of_mixed_sizes_come_back_one_grid_per_image_in_order(lite0: Backbone) -> None:
    sizes = [(64, 64), (80, 96), (64, 64), (96, 64), (80, 96)]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    grids = lite0.features(images)
    expected = [(8, 8), (8, 10), (8, 8), (12, 8), (8, 10)]
    assert [g.shape for g in grids] == [(*e, 40 + 112) for e in expected]
    for grid in grids:
        assert grid.dtype == torch.float32 and grid.is_contiguous()
    for image, grid in zip(images, grids, strict=True):  # each matches the image on its own
        np.testing.assert_allclose(lite0.features([image])[0].numpy(), grid.numpy(), atol=1e-4)


def test_dense_features_hold_the_plain_grid_on_even_rows_and_columns() -> None:
    backbone = create_backbone("efficientnet_lite0", 64, context=1.0)
    image = _image(80, 96)
    (plain,) = backbone.features([image])
    (dense,) = backbone.features([image], dense=True)
    plain, dense = plain.numpy(), dense.numpy()
    assert dense.shape == (2 * plain.shape[0] - 1, 2 * plain.shape[1] - 1, plain.shape[2])
    np.testing.assert_allclose(dense[::2, ::2], plain, atol=1e-5)
    assert not np.allclose(dense[1::2, ::2], plain[:-1], atol=1e-3)  # shifted views differ


def test_features_are_torch_tensors_on_the_backbone_device(lite0: Backbone) -> None:
    assert lite0.device == torch.device("cpu")
    images = [_image(64, 64), _image(80, 96, seed=1)]
    for dense in (False, True):
        grids = lite0.features(images, dense=dense)
        assert len(grids) == len(images)
        for grid in grids:
            assert isinstance(grid, torch.Tensor)
            assert grid.device == lite0.device and grid.dtype == torch.float32
            assert grid.ndim == 3


def test_half_stride_views_move_the_image_up_and_left() -> None:
    batch = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    views = half_stride_views(batch, 2)
    assert views.shape == (8, 3, 8, 8)
    second = views[4:]  # the second image's four views
    torch.testing.assert_close(second[0], batch[1])
    torch.testing.assert_close(second[1][..., :6], batch[1][..., 2:])  # moved left
    torch.testing.assert_close(second[2][..., :6, :], batch[1][..., 2:, :])  # moved up
    torch.testing.assert_close(second[3][..., :6, :6], batch[1][..., 2:, 2:])


def test_interleave_places_each_view_at_its_half_stride_offset() -> None:
    # View (dy, dx) of image b is filled with 100 b + 10 dy + dx.
    values = torch.tensor(
        [100 * b + 10 * dy + dx for b in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    )
    grids = values.float().view(8, 1, 1, 1).expand(8, 2, 3, 4)
    dense = interleave(grids)
    assert dense.shape == (2, 2, 5, 7)
    for b in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                assert (dense[b, :, dy::2, dx::2] == 100 * b + 10 * dy + dx).all()


def test_features_of_different_images_differ(lite0: Backbone) -> None:
    first, second = lite0.features([_image(64, 64, seed=1), _image(64, 64, seed=2)])
    assert not np.allclose(first.numpy(), second.numpy(), atol=1e-3)


def test_every_feature_vector_has_norm_sqrt_of_the_layer_count(lite0: Backbone) -> None:
    (grid,) = lite0.features([_image(80, 96)])
    assert_close(np.linalg.norm(grid.numpy(), axis=-1), np.sqrt(2))


def test_bfloat16_features_are_float32_and_close_to_the_float32_ones() -> None:
    images = [_image(64, 80, seed) for seed in range(2)]
    exact = create_backbone("efficientnet_lite0", 64).features(images)
    fast = create_backbone("efficientnet_lite0", 64, precision="bfloat16").features(images)
    for a, b in zip(exact, fast, strict=True):
        assert b.dtype == torch.float32 and b.shape == a.shape
        a, b = a.numpy(), b.numpy()
        cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cosine.min() > 0.99
        assert not np.array_equal(a, b)  # the lower precision was really used


def test_auto_precision_is_bfloat16_exactly_where_the_cpu_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    expected = "bfloat16" if native_bfloat16() else "float32"
    assert resolve_precision("auto") == expected
    assert create_backbone("efficientnet_lite0", 64, precision="auto").precision == expected
    assert resolve_precision("float32") == "float32"


def test_the_environment_names_what_auto_means_on_every_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for chosen in ("float32", "bfloat16"):
        monkeypatch.setenv(PRECISION_ENV, chosen)
        for device in ("cpu", "cuda", "mps"):
            assert resolve_precision("auto", device) == chosen
        assert create_backbone("efficientnet_lite0", 64, precision="auto").precision == chosen
        assert resolve_precision("float32") == "float32"  # a named precision is kept
    monkeypatch.setenv(PRECISION_ENV, "float16")
    with pytest.raises(ValueError, match="NORMALCY_PRECISION.*auto.*float32.*bfloat16"):
        resolve_precision("auto")


def test_an_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="auto.*float32.*bfloat16"):
        resolve_precision("float16")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        Backbone(
            "fake", _Pyramid(), stride=16, image_size=64, pool=1, layers=(0,), precision="auto"
        )


def test_auto_precision_for_cuda_needs_no_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") in ("float32", "bfloat16")
    for supported, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, _s=supported, **k: _s)
        assert resolve_precision("auto", "cuda") == expected
        assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("float32", "cuda") == "float32"
    assert resolve_precision("bfloat16", "cuda") == "bfloat16"


# --- devices -------------------------------------------------------------------------------------


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(),
    reason="auto picks the accelerator here",
)
def test_auto_device_is_the_cpu_without_an_accelerator() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_the_cpu_device_is_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert create_backbone("efficientnet_lite0", 64, device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cpu:1", "auto:0", "gpu"])
def test_an_unknown_device_is_refused_with_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match=r"auto.*cpu.*cuda.*mps.*" + name):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_cuda_device_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        resolve_device(name)
    with pytest.raises(ValueError, match="CUDA"):
        create_backbone("efficientnet_lite0", 64, device=name)


def test_custom_layers_and_pooling() -> None:
    backbone = create_backbone("efficientnet_lite0", 64, layers=(2,), pool=1)
    assert backbone.layers == (2,) and backbone.pool == 1
    maps = backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 24, 16, 16)]  # end of stage 2, stride 4


def test_efficientnet_rejects_layers_it_does_not_have() -> None:
    with pytest.raises(ValueError):
        create_backbone("efficientnet_lite0", 64, layers=(4, 99))


def test_unknown_backbone_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        create_backbone("resnet_9000", 64)
    with pytest.raises(ValueError, match="dinov2_vits14"):
        default_layers("resnet_9000")


def test_default_layers_are_mid_level() -> None:
    assert default_layers("efficientnet_lite0") == (4, 10)
    assert default_layers("dinov2_vits14") == (6,)
    assert default_layers("dinov2_vitl14") == (12,)
    assert set(BACKBONES) >= {"dinov2_vits14", "dinov2_vitb14_reg", "efficientnet_lite0"}


# --- aggregation ---------------------------------------------------------------------------------


def test_aggregate_resizes_to_the_finest_grid_and_normalises_each_layer() -> None:
    generator = torch.Generator().manual_seed(0)
    fine = torch.randn(2, 3, 8, 12, generator=generator) * 5
    coarse = torch.randn(2, 5, 4, 6, generator=generator) * 0.1
    out = aggregate([fine, coarse], pool=1)
    assert out.shape == (2, 8, 8, 12)
    torch.testing.assert_close(out[:, :3].norm(dim=1), torch.ones(2, 8, 12))
    torch.testing.assert_close(out[:, 3:].norm(dim=1), torch.ones(2, 8, 12))
    torch.testing.assert_close(out.norm(dim=1), torch.full((2, 8, 12), 2**0.5))
    # Without pooling the finest layer is only normalised.
    torch.testing.assert_close(out[:, :3], fine / fine.norm(dim=1, keepdim=True))


def test_aggregate_of_three_layers_has_norm_sqrt_three() -> None:
    maps = [torch.rand(1, c, s, s) + 0.1 for c, s in ((4, 8), (6, 4), (2, 2))]
    out = aggregate(maps, pool=3)
    assert out.shape == (1, 12, 8, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.full((1, 8, 8), 3**0.5))


def test_aggregate_coarse_layer_is_upsampled_smoothly() -> None:
    # A coarse layer whose direction turns from channel 0 to channel 1 left to right.
    coarse = torch.zeros(1, 2, 2, 2)
    coarse[0, 0, :, 0], coarse[0, 1, :, 1] = 1.0, 1.0
    fine = torch.ones(1, 1, 4, 8)
    out = aggregate([fine, coarse], pool=1)[0, 1:]
    assert out.shape == (2, 4, 8)
    share = out[1] / (out[0] + out[1])
    assert torch.all(share[:, 1:] >= share[:, :-1])  # monotone along the width
    assert share[0, 0] < 0.05 and share[0, -1] > 0.95


def test_context_appends_each_patch_difference_from_its_image_median() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 4, 3, 5, generator=generator)]
    plain = aggregate(maps, pool=1)
    out = aggregate(maps, pool=1, context=2.0)
    assert out.shape == (2, 8, 3, 5)
    torch.testing.assert_close(out[:, :4], plain)
    for image in range(2):
        median = plain[image].flatten(1).median(dim=1).values
        torch.testing.assert_close(out[image, 4:], 2.0 * (plain[image] - median[:, None, None]))


def test_context_of_a_uniform_image_is_zero() -> None:
    out = aggregate([torch.ones(1, 3, 4, 4)], pool=1, context=1.0)
    assert torch.count_nonzero(out[:, 3:]) == 0


def test_aggregate_pools_over_a_local_window_ignoring_padding() -> None:
    # Channel 0 is 1 everywhere; channel 1 is a single spike at the top-left corner.
    grid = torch.zeros(1, 2, 6, 6)
    grid[0, 0] = 1.0
    grid[0, 1, 0, 0] = 9.0
    out = aggregate([grid], pool=3)[0]
    ratio = out[1] / out[0]  # the pooled spike over the pooled constant
    support = (ratio > 1e-6).nonzero().tolist()
    assert support == [[0, 0], [0, 1], [1, 0], [1, 1]]  # the spike's 3x3 neighbourhood
    # Windows are averaged over the cells inside the grid only (no zero padding).
    assert ratio[0, 0].item() == pytest.approx(9 / 4)
    assert ratio[0, 1].item() == pytest.approx(9 / 6)
    assert ratio[1, 1].item() == pytest.approx(9 / 9)


def test_the_cnn_runs_channels_last_with_the_same_features() -> None:
    fast = create_backbone("efficientnet_lite0", 64)
    assert fast.channels_last and not create_backbone("dinov2_vits14", 28).channels_last
    plain = Backbone(
        "efficientnet_lite0",
        copy.deepcopy(fast.network).to(memory_format=torch.contiguous_format),
        fast.stride,
        64,
        fast.pool,
        fast.layers,
    )
    images = [_image(64, 80, seed=3), _image(64, 80, seed=4)]
    for a, b in zip(fast.features(images), plain.features(images), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_an_extreme_aspect_ratio_is_held_to_a_bounded_input() -> None:
    backbone = Backbone("fake", _Pyramid(), stride=16, image_size=64, pool=1, layers=(0,))
    assert backbone.input_size(5, 40_000) == (16, 64 * MAX_ASPECT)
    assert backbone.input_size(40_000, 5) == (64 * MAX_ASPECT, 16)
    assert backbone.input_size(64, 64 * MAX_ASPECT) == (64, 64 * MAX_ASPECT)  # up to it: as before


@pytest.mark.parametrize("length", [1, 2, 3, 4, 255, 256, 784])
def test_the_exportable_median_is_torchs_lower_median(length: int) -> None:
    values = torch.randn(2, 5, length)
    torch.testing.assert_close(lower_median(values), values.median(dim=-1).values, rtol=0, atol=0)
