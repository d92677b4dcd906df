"""Tests for normalcy.backbones.memo: a backbone shown the same input twice runs it once."""

from __future__ import annotations

import numpy as np
import torch

from normalcy.backbones import create_backbone
from normalcy.backbones.memo import ForwardMemo, memo_bytes


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(n)]


def _lite0(layers: tuple[int, ...] = (4, 10), tile_scale: float | None = None):
    return create_backbone("efficientnet_lite0", 64, layers, tile_scale=tile_scale)


def test_outputs_from_the_memo_are_those_of_a_pass() -> None:
    backbone, images = _lite0(), _images(3)
    computed = backbone.features(images)
    backbone.memo = ForwardMemo()
    first = backbone.features(images)
    assert backbone.memo.hits == 0
    again = backbone.features(images)
    assert backbone.memo.hits == 3 * 2  # three images, two layers each
    for a, b, c in zip(computed, first, again, strict=True):
        torch.testing.assert_close(b, a)  # same pass, same batch
        assert torch.equal(c, b)  # stored values, returned as they were


def test_a_backbone_with_fewer_layers_reads_what_a_wider_one_stored() -> None:
    memo, images = ForwardMemo(), _images(2)
    wide, narrow = _lite0((4, 10)), _lite0((10,))
    wide.memo = narrow.memo = memo
    wide.features(images)
    shared = narrow.features(images)
    assert memo.hits == 2
    narrow.memo = None
    for a, b in zip(narrow.features(images), shared, strict=True):
        torch.testing.assert_close(a, b)


def test_a_planted_change_recomputes_only_the_tiles_it_touches() -> None:
    backbone = _lite0(tile_scale=2.0)
    backbone.memo = ForwardMemo()
    image = _images(1)[0]
    backbone.feature_dims()  # its one blank pass, before counting
    before = len(backbone.memo)
    backbone.features([image])
    tiles = (len(backbone.memo) - before) // 2  # two layers a tile
    assert tiles > 4
    changed = image.copy()
    changed[2:6, 2:6] = 255 - changed[2:6, 2:6]  # one corner
    backbone.features([changed])
    recomputed = (len(backbone.memo) - before) // 2 - tiles
    assert 0 < recomputed < tiles  # the others came from the memo
    assert backbone.memo.hits == 2 * (tiles - recomputed)


def test_nothing_is_read_while_writing_only_and_nothing_stored_past_the_bound() -> None:
    backbone, images = _lite0(), _images(2)
    backbone.memo = ForwardMemo()
    with backbone.memo.writing_only():
        backbone.features(images)
        backbone.features(images)
    assert backbone.memo.hits == 0 and backbone.memo.bytes > 0
    backbone.memo = ForwardMemo(max_bytes=backbone.memo.bytes // 2)
    backbone.features(images)
    assert 0 < backbone.memo.bytes <= backbone.memo.max_bytes
    assert 0 < memo_bytes() <= 1 << 30


def test_attached_lends_a_memo_for_a_block_and_keeps_one_already_there() -> None:
    backbone, memo, other = _lite0(), ForwardMemo(), ForwardMemo()
    with memo.attached(backbone):
        assert backbone.memo is memo
        with other.attached(backbone):
            assert backbone.memo is memo
    assert backbone.memo is None
