"""Tests for normalcy.methods.patchknn (and the method registry)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

from normalcy.methods import METHODS, create_method, method_from_state
from normalcy.methods.patchknn import PatchKNN, _nearest_exact, _nearest_reranked, _ranking

DIM = 24


def _normal_grids(n: int, seed: int = 0, size: tuple[int, int] = (6, 8)) -> list[np.ndarray]:
    """Feature grids whose patches lie near a few 'normal' prototypes."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(99).standard_normal((5, DIM)).astype(np.float32)
    grids = []
    for _ in range(n):
        picks = rng.integers(0, 5, size)
        noise = rng.standard_normal((*size, DIM)).astype(np.float32) * 0.05
        grids.append(prototypes[picks] + noise)
    return grids


def _brute_force(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Distance of each query row to its nearest bank row, in float64."""
    diff = queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)
    return np.sqrt((diff**2).sum(-1)).min(axis=1)


def test_planted_anomalous_patches_score_above_every_normal_patch() -> None:
    method = PatchKNN(coreset_ratio=0.25).fit(_normal_grids(10))
    test = _normal_grids(1, seed=5)[0]
    anomalous = [(1, 2), (4, 6)]
    rng = np.random.default_rng(6)
    for row, col in anomalous:
        test[row, col] = rng.standard_normal(DIM).astype(np.float32) * 2
    scores = method.score(test)
    assert scores.shape == (6, 8) and scores.dtype == torch.float32
    scores = scores.numpy()
    normal = np.ones((6, 8), dtype=bool)
    for row, col in anomalous:
        normal[row, col] = False
    assert scores[~normal].min() > 5 * scores[normal].max()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_nearest_distances_match_brute_force(precision: str) -> None:
    rng = np.random.default_rng(1)
    grids = [rng.standard_normal((5, 7, DIM)).astype(np.float32) for _ in range(4)]
    method = PatchKNN(coreset_ratio=1.0, precision=precision).fit(grids)
    assert method.memory_bank_.shape == (4 * 35, DIM)  # ratio 1 keeps every patch
    query = rng.standard_normal((9, 11, DIM)).astype(np.float32)
    expected = _brute_force(method.memory_bank_, query.reshape(-1, DIM)).reshape(9, 11)
    assert_close(method.score(query), expected)


def test_bfloat16_search_in_small_chunks_gives_the_float32_distances() -> None:
    exact = PatchKNN(coreset_ratio=0.5).fit(_normal_grids(4))
    fast = PatchKNN.from_state({**exact.get_params(), "precision": "bfloat16"}, exact.arrays())
    query = np.random.default_rng(2).standard_normal((10, 10, DIM)).astype(np.float32)
    bank, ranking = fast._index(torch.device("cpu"))
    assert ranking.dtype == torch.bfloat16
    chunked = _nearest_reranked(torch.from_numpy(query.reshape(-1, DIM)), bank, ranking, chunk=7)
    assert_close(np.sqrt(chunked.numpy()).reshape(10, 10), exact.score(query).numpy())


def test_bfloat16_search_remeasures_neighbours_too_close_for_bfloat16_to_tell_apart() -> None:
    base = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
    twins = np.stack([base + 1e-4 * k for k in range(6)])  # one bfloat16 value apart at most
    method = PatchKNN(coreset_ratio=1.0, precision="bfloat16").fit([twins])
    scores = method.score(twins[None])
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)  # each finds itself, not a twin


def test_an_unknown_search_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        PatchKNN(precision="int8")


def test_patches_of_the_bank_score_zero() -> None:
    grids = _normal_grids(3)
    method = PatchKNN(coreset_ratio=1.0).fit(grids)
    np.testing.assert_allclose(method.score(grids[1]), 0.0, atol=2e-3)


def test_fit_accepts_patch_lists_and_bounds_the_bank() -> None:
    patches = [g.reshape(-1, DIM) for g in _normal_grids(8)]
    method = PatchKNN(coreset_ratio=0.5, max_bank_size=30).fit(iter(patches))
    assert method.memory_bank_.shape == (30, DIM)
    assert method.n_patches_seen_ == 8 * 48


def test_state_round_trips_through_arrays_and_from_state() -> None:
    method = PatchKNN(coreset_ratio=0.3, max_bank_size=50, projection_dim=16, seed=4)
    method.fit(_normal_grids(6))
    query = _normal_grids(1, seed=7)[0]
    arrays = method.arrays()
    assert set(arrays) == {"memory_bank"}
    restored = PatchKNN.from_state(method.get_params(), {k: v.copy() for k, v in arrays.items()})
    assert restored.get_params() == {
        "coreset_ratio": 0.3,
        "max_bank_size": 50,
        "projection_dim": 16,
        "seed": 4,
        "precision": "float32",
    }
    # The stored bank comes back bit for bit; scores from it are recomputed.
    np.testing.assert_array_equal(restored.memory_bank_, method.memory_bank_)
    assert_close(restored.score(query), method.score(query))


def test_from_state_converts_the_bank_to_contiguous_float32() -> None:
    bank = np.random.default_rng(3).standard_normal((20, 2 * DIM))[:, ::2]  # float64 view
    restored = PatchKNN.from_state(PatchKNN().get_params(), {"memory_bank": bank})
    assert restored.memory_bank_.dtype == np.float32 and restored.memory_bank_.flags.c_contiguous
    query = np.random.default_rng(4).standard_normal((2, 3, DIM)).astype(np.float32)
    expected = _brute_force(bank, query.reshape(-1, DIM)).reshape(2, 3)
    assert_close(restored.score(query), expected)


def test_refit_replaces_the_bank() -> None:
    method = PatchKNN(coreset_ratio=1.0).fit([np.zeros((2, 2, DIM), dtype=np.float32)])
    query = np.ones((1, 1, DIM), dtype=np.float32)
    assert_close(method.score(query)[0, 0], np.sqrt(DIM))
    method.fit([np.ones((2, 2, DIM), dtype=np.float32)])
    assert method.score(query)[0, 0] == pytest.approx(0.0, abs=1e-3)


def test_scoring_before_fit_raises() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchKNN().score(np.zeros((2, 2, DIM), dtype=np.float32))


def test_scoring_features_of_another_width_raises() -> None:
    method = PatchKNN().fit(_normal_grids(2))
    with pytest.raises(ValueError, match=f"{DIM}"):
        method.score(np.zeros((2, 2, DIM + 1), dtype=np.float32))


def test_fit_on_nothing_raises() -> None:
    with pytest.raises(ValueError):
        PatchKNN().fit([])


def test_registry_creates_and_restores_patchknn() -> None:
    assert METHODS["patchknn"] is PatchKNN
    method = create_method("patchknn", coreset_ratio=1.0)
    assert isinstance(method, PatchKNN) and method.coreset_ratio == 1.0
    method.fit(_normal_grids(2))
    restored = method_from_state("patchknn", method.get_params(), method.arrays())
    np.testing.assert_array_equal(restored.memory_bank_, method.memory_bank_)  # the same array
    with pytest.raises(ValueError, match="patchknn"):
        create_method("nope")
    with pytest.raises(ValueError, match="nope"):
        method_from_state("nope", {}, {})


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_score_batch_gives_each_grid_the_scores_of_score(precision: str) -> None:
    method = PatchKNN(coreset_ratio=0.5, precision=precision).fit(_normal_grids(4))
    rng = np.random.default_rng(8)
    grids = [rng.standard_normal((*size, DIM)).astype(np.float32) for size in [(3, 4), (6, 8)]]
    grids.append(torch.from_numpy(_normal_grids(1, seed=9)[0]))
    results = method.score_batch(grids)
    assert len(results) == len(grids)
    for grid, result in zip(grids, results, strict=True):
        expected = method.score(grid)
        assert result.patches.shape == tuple(grid.shape[:2])
        assert result.patches.dtype == torch.float32
        assert result.ranking is None and result.image is None
        assert_close(result.patches.numpy(), expected.numpy())
    assert method.score_batch([]) == []


def test_exact_matrix_product_search_in_blocks_matches_brute_force() -> None:
    rng = np.random.default_rng(10)
    bank = rng.standard_normal((300, DIM)).astype(np.float32)
    queries = rng.standard_normal((500, DIM)).astype(np.float32)
    bank_t = torch.from_numpy(bank)
    ranking = _ranking(bank_t)
    found = _nearest_exact(torch.from_numpy(queries), bank_t, ranking, chunk=64).numpy()
    assert_close(found, _brute_force(bank, queries) ** 2)


def test_bfloat16_search_gives_the_float32_distances() -> None:
    rng = np.random.default_rng(11)
    grids = [rng.standard_normal((6, 8, DIM)).astype(np.float32) for _ in range(5)]
    exact = PatchKNN(coreset_ratio=0.5, precision="float32").fit(grids)
    fast = PatchKNN.from_state({**exact.get_params(), "precision": "bfloat16"}, exact.arrays())
    query = rng.standard_normal((12, 10, DIM)).astype(np.float32)
    np.testing.assert_allclose(
        fast.score(query).numpy(), exact.score(query).numpy(), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_left_out_scores_search_the_bank_without_the_grids_own_patches(precision: str) -> None:
    grids = _normal_grids(5)
    method = PatchKNN(coreset_ratio=0.5, precision=precision).fit(grids)
    assert method.bank_sources_.shape == (len(method.memory_bank_),)
    assert set(method.bank_sources_) == set(range(5))
    for source in (0, 3):
        # The exact nearest patch among the others', whatever the search precision (bfloat16
        # candidates cannot tell apart the near ties a bank's own images have).
        others = method.memory_bank_[method.bank_sources_ != source]
        exact = _brute_force(others, grids[source].reshape(-1, DIM)).reshape(6, 8)
        (left_out,) = method.score_left_out([torch.from_numpy(grids[source])], [source])
        assert_close(left_out.patches.numpy(), exact)


def test_a_loaded_bank_cannot_score_left_out() -> None:
    method = PatchKNN(coreset_ratio=1.0).fit(_normal_grids(2))
    loaded = PatchKNN.from_state(method.get_params(), method.arrays())
    with pytest.raises(RuntimeError, match="need the fit itself"):
        loaded.score_left_out([torch.zeros(2, 2, DIM)], [0])
    alone = PatchKNN(coreset_ratio=1.0).fit(_normal_grids(1))
    with pytest.raises(ValueError, match="nothing left"):
        alone.score_left_out([torch.zeros(2, 2, DIM)], [0])


def test_leaving_an_image_out_removes_all_of_its_augmented_views() -> None:
    grids = _normal_grids(4, seed=3)
    # two images, each giving two views; the second view of image 0 repeats its first
    fitted = PatchKNN(coreset_ratio=1.0).fit([grids[0], grids[0], grids[1], grids[2]])
    query = torch.from_numpy(grids[0])
    one_view = fitted.score_left_out([query], [0], views=1)[0].patches
    whole_image = fitted.score_left_out([query], [0], views=2)[0].patches
    assert float(one_view.max()) == pytest.approx(0.0, abs=1e-3)  # its twin view is found
    assert float(whole_image.min()) > 0.01  # only the other image's patches remain
