"""Tests for normalcy.methods.gaussian."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from sklearn.covariance import LedoitWolf

from normalcy.methods import create_method, method_from_state
from normalcy.methods.gaussian import GaussianScorer, Moments, whitening

DIM = 12


def _grids(n: int, cov: np.ndarray, seed: int = 0, size=(5, 6)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(cov)
    return [
        (rng.standard_normal((*size, cov.shape[0])) @ chol.T + 1.5).astype(np.float32)
        for _ in range(n)
    ]


def _known_covariance(dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(42)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    return basis @ np.diag(np.linspace(0.2, 3.0, dim)) @ basis.T


@pytest.mark.parametrize(("n", "p"), [(50, 20), (30, 60), (500, 10)])
def test_streamed_ledoit_wolf_matches_scikit_learn(n: int, p: int) -> None:
    rng = np.random.default_rng(n + p)
    x = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + 3
    moments = Moments(p)
    for chunk in np.array_split(x, 3):
        moments.add(chunk)
    mean, cov, shrinkage = moments.mean_and_covariance()
    reference = LedoitWolf().fit(x)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(cov, reference.covariance_, atol=1e-9)
    assert shrinkage == pytest.approx(reference.shrinkage_, abs=1e-9)


def test_patch_gaussian_recovers_a_known_covariance() -> None:
    cov = _known_covariance()
    scorer = GaussianScorer().fit(_grids(200, cov))
    # the whitening W satisfies W W^T = cov^-1 for the fitted covariance
    recovered = np.linalg.inv(scorer.patch_whitening_ @ scorer.patch_whitening_.T)
    assert np.abs(recovered - cov).max() < 0.1
    np.testing.assert_allclose(scorer.patch_mean_, 1.5, atol=0.05)


def test_mahalanobis_scores_match_the_definition() -> None:
    cov = _known_covariance()
    scorer = GaussianScorer().fit(_grids(100, cov))
    query = _grids(1, cov, seed=9)[0]
    precision = np.linalg.inv(np.linalg.inv(scorer.patch_whitening_ @ scorer.patch_whitening_.T))
    diff = query.reshape(-1, DIM) - scorer.patch_mean_
    expected = np.sqrt(np.einsum("ij,jk,ik->i", diff, precision, diff)).reshape(5, 6)
    assert_close(scorer.score(query), expected)


def test_planted_patch_and_shifted_image_score_higher() -> None:
    cov = _known_covariance()
    scorer = GaussianScorer().fit(_grids(60, cov))
    normal = _grids(1, cov, seed=7)[0]
    planted = normal.copy()
    planted[2, 3] += 8 * np.linalg.eigh(cov)[1][:, 0]  # along the least-varying direction
    scores = scorer.score(planted).numpy()
    others = np.delete(scores.ravel(), 2 * 6 + 3)
    assert scores[2, 3] > 2 * others.max()
    shifted = normal + 2 * np.linalg.eigh(cov)[1][:, 0]
    assert scorer.image_score(shifted) > 3 * scorer.image_score(normal)


def test_low_variance_components_keep_the_requested_share() -> None:
    cov = np.diag([1.0, 2.0, 3.0, 4.0])
    kept = whitening(cov, low_variance_fraction=0.3)  # 1 + 2 = 3 of 10 is the share
    assert kept.shape == (4, 2)
    np.testing.assert_allclose(np.abs(kept).max(axis=0), [1.0, 1 / np.sqrt(2)], rtol=1e-9)
    with pytest.raises(ValueError, match="low_variance_fraction"):
        GaussianScorer(low_variance_fraction=1.5)


def test_save_state_round_trip_gives_the_same_scores() -> None:
    cov = _known_covariance()
    scorer = create_method("gaussian", low_variance_fraction=0.5).fit(_grids(30, cov))
    restored = method_from_state("gaussian", scorer.get_params(), scorer.arrays())
    query = _grids(1, cov, seed=3)[0]
    assert_close(restored.score(query), scorer.score(query))
    assert_close(restored.image_score(query), scorer.image_score(query))


def test_misuse_gives_clear_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianScorer().score(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        GaussianScorer().fit(_grids(1, np.eye(3)))
    scorer = GaussianScorer().fit(_grids(5, np.eye(3)))
    with pytest.raises(ValueError, match="the model has 3"):
        scorer.score(np.zeros((2, 2, 4), np.float32))
