"""Tests for normalcy.methods.fused: patch kNN and a patch Gaussian, standardised and averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

from normalcy.methods import create_method, method_from_state
from normalcy.methods.fused import KNNGaussianFusion
from normalcy.methods.gaussian import GaussianScorer
from normalcy.methods.patchknn import PatchKNN

DIM = 8


def _grids(n: int, seed: int, channels: int = DIM) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.2, 2.0, channels)
    return [(rng.standard_normal((6, 7, channels)) * scales).astype(np.float32) for _ in range(n)]


def _fitted(context_half: bool = False, channels: int = DIM) -> KNNGaussianFusion:
    fusion = KNNGaussianFusion(coreset_ratio=1.0, context_half=context_half)
    fusion.fit(_grids(20, seed=0, channels=channels))
    return fusion.calibrate([fusion.parts(g) for g in _grids(5, seed=1, channels=channels)])


def test_parts_are_the_knn_and_gaussian_scores_of_the_same_patches() -> None:
    train = _grids(20, seed=0)
    fusion = KNNGaussianFusion(coreset_ratio=1.0).fit(train)
    knn = PatchKNN(coreset_ratio=1.0).fit(train)
    gaussian = GaussianScorer().fit(train)
    query = _grids(1, seed=2)[0]
    parts = fusion.parts(query)
    assert parts.shape == (2, 6, 7) and parts.dtype == torch.float32
    assert_close(parts[0], knn.score(query))
    assert_close(parts[1], gaussian.score(query))


def test_calibrated_parts_have_zero_mean_and_unit_spread_on_the_normal_images() -> None:
    fusion = KNNGaussianFusion(coreset_ratio=1.0).fit(_grids(20, seed=0))
    normal = [fusion.parts(g) for g in _grids(5, seed=1)]
    fusion.calibrate(normal)
    values = np.concatenate([p.numpy().reshape(2, -1) for p in normal], axis=1)
    standardised = (values - fusion.part_mean_[:, None]) / fusion.part_std_[:, None]
    np.testing.assert_allclose(standardised.mean(axis=1), 0, atol=1e-6)
    assert_close(standardised.std(axis=1), 1)
    expected = standardised.mean(axis=0)
    combined = np.concatenate([fusion.combine(p).numpy().ravel() for p in normal])
    assert_close(combined, expected)


def test_a_planted_patch_scores_highest() -> None:
    fusion = _fitted()
    query = _grids(1, seed=3)[0]
    query[2, 4] += 6.0
    scores = fusion.score(query).numpy()
    assert np.unravel_index(scores.argmax(), scores.shape) == (2, 4)
    assert scores[2, 4] > np.delete(scores.ravel(), 2 * 7 + 4).max() + 1


def test_with_context_the_gaussian_models_the_appearance_half_only() -> None:
    fusion = _fitted(context_half=True, channels=2 * DIM)
    assert fusion.gaussian_.patch_mean_.size == DIM
    assert fusion.knn_.memory_bank_.shape[1] == 2 * DIM
    assert fusion.score(_grids(1, seed=4, channels=2 * DIM)[0]).shape == (6, 7)


def test_save_state_round_trip_gives_the_same_scores() -> None:
    fusion = _fitted(context_half=True, channels=2 * DIM)
    restored = method_from_state(fusion.name, fusion.get_params(), fusion.arrays())
    query = _grids(1, seed=5, channels=2 * DIM)[0]
    assert_close(restored.score(query), fusion.score(query))
    assert restored.get_params() == fusion.get_params()


def test_score_held_out_calibrates_on_the_held_out_grids_then_scores_them() -> None:
    train, held_out = _grids(20, seed=0), _grids(5, seed=1)
    fusion = KNNGaussianFusion(coreset_ratio=1.0).fit(train)
    results = fusion.score_held_out(held_out)
    reference = _fitted()  # calibrated on the same held-out grids
    assert_close(fusion.part_mean_, reference.part_mean_)
    assert_close(fusion.part_std_, reference.part_std_)
    assert len(results) == len(held_out)
    for grid, result in zip(held_out, results, strict=True):
        assert_close(result.patches.numpy(), fusion.score(grid).numpy())
        # the image is ranked by the kNN part alone
        np.testing.assert_allclose(result.ranking.numpy(), fusion.parts(grid)[0].numpy())
    query = _grids(1, seed=3)[0]
    (batch,) = fusion.score_batch([query])
    assert_close(batch.patches.numpy(), fusion.score(query).numpy())


def test_misuse_gives_clear_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        KNNGaussianFusion().parts(np.zeros((2, 2, 3), np.float32))
    fusion = create_method("patchknn+gaussian", coreset_ratio=1.0).fit(_grids(4, seed=0))
    with pytest.raises(RuntimeError, match="not calibrated"):
        fusion.score(_grids(1, seed=1)[0])
    with pytest.raises(ValueError, match="held-out normal images"):
        fusion.calibrate([])
