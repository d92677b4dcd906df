"""Tests for normalcy.methods.mutual (zero-shot scoring within a batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

from normalcy.methods.mutual import (
    MutualScorer,
    content_key,
    mean_of_smallest,
    nearest_distances,
    neighbourhood_features,
    rescore,
    sub_batches,
)
from normalcy.postprocess import image_score, score_map

DIM = 16


def _batch(n: int, planted: set[int], seed: int = 0, noise: float = 0.05) -> list[np.ndarray]:
    """Grids of mixed sizes built from shared prototypes; `planted` images get a 2x2 defect."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(99).standard_normal((4, DIM))
    grids = []
    for i in range(n):
        size = (8, 10) if i % 2 else (9, 7)
        grid = prototypes[rng.integers(0, 4, size)] + noise * rng.standard_normal((*size, DIM))
        if i in planted:
            grid[2:4, 3:5] = 2 * rng.standard_normal((2, 2, DIM))
        grids.append(grid.astype(np.float32))
    return grids


def _maps(scorer: MutualScorer, grids: list[np.ndarray]) -> list[np.ndarray]:
    """`patch_scores` of the batch, checked to be (h, w) float32 tensors, as numpy arrays."""
    maps = scorer.patch_scores(grids)
    assert len(maps) == len(grids)
    for grid, scores in zip(grids, maps, strict=True):
        assert torch.is_tensor(scores) and scores.dtype == torch.float32
        assert tuple(scores.shape) == grid.shape[:2]
    return [scores.numpy() for scores in maps]


def test_planted_defects_score_above_normal_patches() -> None:
    planted = {0, 5}
    grids = _batch(12, planted)
    maps = _maps(MutualScorer(), grids)
    for i in planted:
        defect = maps[i][2:4, 3:5]
        rest = np.delete(maps[i].ravel(), [2 * maps[i].shape[1] + c for c in (3, 4)])
        assert defect.min() > rest.mean() * 2
    normal_peak = max(maps[i].max() for i in range(12) if i not in planted)
    assert min(maps[i][2:4, 3:5].mean() for i in planted) > normal_peak


def test_scores_do_not_depend_on_image_order_or_block_size() -> None:
    grids = _batch(9, {3})
    musc = {"neighbourhoods": (1, 3, 5), "rescore_neighbours": 8, "precision": "float32"}
    maps = _maps(MutualScorer(block_patches=150, **musc), grids)
    order = np.random.default_rng(4).permutation(9)
    shuffled = _maps(MutualScorer(block_patches=100_000, **musc), [grids[i] for i in order])
    for position, original in enumerate(order):
        assert_close(shuffled[position], maps[original])


def test_a_large_batch_is_split_into_spread_sub_batches_whatever_its_order() -> None:
    grids = _batch(12, {0, 7})
    keys = [content_key(g) for g in grids]
    groups = sub_batches(keys, 5)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert sorted(i for g in groups for i in g) == list(range(12))
    assert sub_batches(keys, 12) == [list(range(12))]
    order = np.random.default_rng(1).permutation(12)
    regrouped = sub_batches([keys[i] for i in order], 5)
    assert sorted(sorted(order[i] for i in g) for g in regrouped) == sorted(groups)

    scorer = MutualScorer(max_peers=5, precision="float32")
    maps = _maps(scorer, grids)
    shuffled = _maps(scorer, [grids[i] for i in order])
    for position, original in enumerate(order):
        assert_close(shuffled[position], maps[original])
    # each image is scored by its own sub-batch alone
    group = groups[0]
    alone = _maps(MutualScorer(precision="float32"), [grids[i] for i in group])
    for i, own in zip(group, alone, strict=True):
        assert_close(maps[i], own)
    assert scorer.n_blocks(grids) == 3


def test_bfloat16_products_give_nearly_the_float32_scores() -> None:
    # nearest patches about 0.3 apart, as real images' are (bfloat16 blurs near-twins only)
    grids = _batch(10, {2}, noise=0.3)
    exact = _maps(MutualScorer(precision="float32"), grids)
    fast = _maps(MutualScorer(precision="bfloat16"), grids)
    assert 0.2 < np.median(np.concatenate([e.ravel() for e in exact])) < 0.5
    for a, b in zip(exact, fast, strict=True):
        np.testing.assert_allclose(b, a, rtol=0.03, atol=0.01)
    assert np.argmax(fast[2]) == np.argmax(exact[2])


def test_nearest_distances_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    patches = [
        torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, DIM))).float())
        for n in (5, 9, 4)
    ]
    tables = nearest_distances(patches, block_patches=6)
    for i, table in enumerate(tables):
        assert torch.isinf(table[:, i]).all()
        for j, other in enumerate(patches):
            if j != i:
                expected = torch.cdist(patches[i].double(), other.double()).amin(dim=1)
                torch.testing.assert_close(table[:, j].double(), expected, rtol=1e-4, atol=1e-4)


def test_a_defect_shared_by_a_few_images_still_stands_out() -> None:
    # with 3 of 20 images sharing the same defect, the smallest 30% of distances reach images
    # without it, so the defect does not vouch for itself
    rng = np.random.default_rng(3)
    grids = _batch(20, set())
    defect = 2 * rng.standard_normal(DIM).astype(np.float32)
    for i in (1, 2, 3):
        grids[i][4, 4] = defect
    maps = _maps(MutualScorer(neighbourhoods=(1,)), grids)
    assert maps[1][4, 4] > 5 * np.median(maps[1])


def test_mean_of_smallest_ignores_the_image_itself() -> None:
    table = torch.tensor([[np.inf, 1.0, 2.0, 3.0, 4.0]])
    assert mean_of_smallest(table, 0.5).item() == pytest.approx(1.5)
    assert mean_of_smallest(table, 0.01).item() == pytest.approx(1.0)


def test_neighbourhood_features_are_unit_length_averages() -> None:
    grid = np.random.default_rng(0).standard_normal((4, 5, DIM)).astype(np.float32)
    single = neighbourhood_features(grid, 1)
    assert_close(
        single.numpy(),
        grid.reshape(-1, DIM) / np.linalg.norm(grid.reshape(-1, DIM), axis=1, keepdims=True),
    )
    pooled = neighbourhood_features(grid, 3)
    centre = grid[0:3, 0:3].reshape(-1, DIM).mean(axis=0)
    assert_close(pooled[1 * 5 + 1].numpy(), centre / np.linalg.norm(centre))
    assert_close(torch.linalg.norm(pooled, dim=1).numpy(), 1.0)


def test_rescoring_damps_an_isolated_high_score_among_look_alikes() -> None:
    features = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.12], [0.0, 1.0], [0.1, 0.99]])
    scores = np.array([5.0, 1.0, 1.0, 3.0, 3.0])
    smoothed = rescore(scores, features, neighbours=1)
    assert smoothed[0] == pytest.approx((5 + 1) / 2)
    assert smoothed[3] == pytest.approx(3.0)
    np.testing.assert_allclose(rescore(scores, features, neighbours=0), scores)


def test_too_small_a_batch_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="at least 3 images"):
        MutualScorer().patch_scores(_batch(2, set()))
    with pytest.raises(ValueError, match="at least 3 images"):
        MutualScorer().score_batch(_batch(2, set()))
    with pytest.raises(ValueError, match="odd"):
        MutualScorer(neighbourhoods=(2,))
    with pytest.raises(ValueError, match="rescore_neighbours"):
        MutualScorer(rescore_neighbours=-1)
    with pytest.raises(ValueError, match="max_peers"):
        MutualScorer(max_peers=2)
    with pytest.raises(ValueError, match="precision"):
        MutualScorer(precision="half")


def test_a_small_batch_is_scored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="normalcy"):
        MutualScorer().patch_scores(_batch(5, set()))
    assert "only 5 images" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="normalcy"):
        MutualScorer(neighbourhoods=(1,)).patch_scores(_batch(20, set()))
    assert caplog.text == ""


def test_score_batch_gives_the_patch_scores_and_with_rescoring_smoothed_image_scores() -> None:
    grids = _batch(8, {1})
    scorer = MutualScorer(precision="float32")
    plain = scorer.score_batch(grids)
    for result, expected in zip(plain, scorer.patch_scores(grids), strict=True):
        assert_close(result.patches.numpy(), expected.numpy())
        assert result.ranking is None and result.image is None
    rescoring = MutualScorer(precision="float32", rescore_neighbours=2)
    rescored = rescoring.score_batch(grids)
    patches = [r.patches for r in rescored]
    for own, unsmoothed in zip(patches, plain, strict=True):  # re-scoring leaves the maps be
        assert_close(own.numpy(), unsmoothed.patches.numpy())
    ranked = np.array([image_score(score_map(p, rescoring.sigma)) for p in patches])
    features = np.stack([g.reshape(-1, DIM).mean(axis=0) for g in grids])
    assert_close([r.image for r in rescored], rescore(ranked, features, 2))
    assert all(isinstance(r.image, float) for r in rescored)
