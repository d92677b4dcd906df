"""Tests for normalcy.methods.coreset: greedy k-center selection and the streaming coreset."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy.methods.coreset import (
    FINISH_FACTOR,
    PART_ROWS,
    StreamingCoreset,
    greedy_coreset,
    random_projection,
)


def _blobs(
    n_clusters: int, per_cluster: int, dim: int, spread: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters (centres ~100 apart, radius ~spread) and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 100
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    points = centres[labels] + rng.standard_normal((len(labels), dim)) * spread
    order = rng.permutation(len(labels))
    return points[order].astype(np.float32), labels[order]


# --- greedy_coreset ------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 256])  # 256 > projection_dim: distances are projected
def test_far_outliers_are_picked_first(dim: int) -> None:
    rng = np.random.default_rng(1)
    cluster = rng.standard_normal((500, dim)).astype(np.float32)
    outliers = np.zeros((3, dim), dtype=np.float32)
    for i in range(3):
        outliers[i, i] = 100.0
    points = np.concatenate([cluster, outliers])
    selected = greedy_coreset(points, 4)
    assert set(selected.tolist()) >= {500, 501, 502}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_cluster_of_a_separated_mixture_gets_a_centre(seed: int) -> None:
    points, labels = _blobs(n_clusters=7, per_cluster=60, dim=16, seed=seed)
    selected = greedy_coreset(points, 7, seed=seed)
    assert sorted(labels[selected].tolist()) == list(range(7))


def test_projected_distances_still_cover_every_cluster() -> None:
    points, labels = _blobs(n_clusters=5, per_cluster=40, dim=512, seed=3)
    selected = greedy_coreset(points, 5, projection_dim=32)
    assert sorted(labels[selected].tolist()) == list(range(5))


def test_selection_bounds_the_covering_radius() -> None:
    # k-center guarantee: every point lies within the distance of the last pick to the others.
    points = np.random.default_rng(4).standard_normal((400, 6)).astype(np.float32)
    selected = greedy_coreset(points, 40, projection_dim=0)
    gaps = np.linalg.norm(points[:, None] - points[selected][None], axis=-1).min(axis=1)
    later = np.linalg.norm(points[selected[-1]] - points[selected[:-1]], axis=-1).min()
    assert gaps.max() <= later + 1e-4


def test_returns_all_indices_when_asked_for_at_least_n() -> None:
    points = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    np.testing.assert_array_equal(greedy_coreset(points, 10), np.arange(10))
    np.testing.assert_array_equal(greedy_coreset(points, 25), np.arange(10))


def test_returns_the_requested_number_of_distinct_valid_indices() -> None:
    points = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    selected = greedy_coreset(points, 37)
    assert selected.shape == (37,) and selected.dtype == np.int64
    assert len(set(selected.tolist())) == 37
    assert selected.min() >= 0 and selected.max() < 300


def test_duplicate_rows_are_never_selected_twice() -> None:
    points = np.tile(np.eye(3, 8, dtype=np.float32), (40, 1))  # 3 distinct rows, 120 in all
    selected = greedy_coreset(points, 10)
    assert len(set(selected.tolist())) == 10


def test_is_deterministic_for_a_seed() -> None:
    points = np.random.default_rng(5).standard_normal((500, 200)).astype(np.float32)
    first = greedy_coreset(points, 50, seed=3)
    np.testing.assert_array_equal(first, greedy_coreset(points.copy(), 50, seed=3))
    others = [greedy_coreset(points, 50, seed=s) for s in range(4, 8)]
    assert any(not np.array_equal(first, other) for other in others)


def test_accepts_float64_and_non_contiguous_input() -> None:
    points, labels = _blobs(n_clusters=4, per_cluster=30, dim=10, seed=6)
    wide = np.repeat(points.astype(np.float64), 2, axis=1)[:, ::2]  # a strided view
    assert not wide.flags.c_contiguous
    selected = greedy_coreset(wide, 4)
    assert sorted(labels[selected].tolist()) == [0, 1, 2, 3]


def test_zero_selection_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        greedy_coreset(np.zeros((5, 3), dtype=np.float32), 0)


def test_random_projection_roughly_preserves_distances() -> None:
    rng = np.random.default_rng(7)
    points = rng.standard_normal((50, 1000)).astype(np.float32)
    projection = random_projection(1000, 256, seed=0)
    assert projection.shape == (1000, 256) and projection.dtype == np.float32
    before = np.linalg.norm(points[:25] - points[25:], axis=1)
    after = np.linalg.norm((points[:25] - points[25:]) @ projection, axis=1)
    np.testing.assert_allclose(after / before, 1.0, atol=0.2)
    np.testing.assert_array_equal(projection, random_projection(1000, 256, seed=0))


# --- StreamingCoreset ----------------------------------------------------------------------------


def _chunks(n_chunks: int, rows: int, dim: int = 12, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows, dim)).astype(np.float32) for _ in range(n_chunks)]


def test_streaming_keeps_the_ratio_of_each_chunk() -> None:
    coreset = StreamingCoreset(ratio=0.1, max_size=10_000)
    for chunk in _chunks(6, 100):
        coreset.add(chunk)
    bank = coreset.finish()
    assert bank.shape == (60, 12) and bank.dtype == np.float32
    assert coreset.n_seen == 600


def test_streaming_is_bounded_by_max_size() -> None:
    coreset = StreamingCoreset(ratio=0.5, max_size=40)
    for chunk in _chunks(6, 100):
        coreset.add(chunk)
    assert coreset.finish().shape == (40, 12)


def test_streaming_rows_are_rows_of_the_input() -> None:
    chunks = _chunks(3, 50)
    coreset = StreamingCoreset(ratio=0.2, max_size=25)
    for chunk in chunks:
        coreset.add(chunk)
    bank = coreset.finish()
    everything = np.concatenate(chunks)
    distances = np.linalg.norm(bank[:, None] - everything[None], axis=-1).min(axis=1)
    np.testing.assert_array_equal(distances, 0.0)  # kept points are copies: x - x is exactly 0


def test_streaming_ratio_one_keeps_everything_in_order() -> None:
    chunks = _chunks(3, 7)
    coreset = StreamingCoreset(ratio=1.0, max_size=100)
    for chunk in chunks:
        coreset.add(chunk)
    np.testing.assert_array_equal(coreset.finish(), np.concatenate(chunks))  # copies, not sums


def test_streaming_keeps_at_least_one_row_per_chunk() -> None:
    coreset = StreamingCoreset(ratio=0.01, max_size=100)
    for chunk in _chunks(5, 10):
        coreset.add(chunk)
    assert len(coreset.finish()) == 5


def test_streaming_keeps_a_rare_cluster() -> None:
    rng = np.random.default_rng(8)
    coreset = StreamingCoreset(ratio=0.05, max_size=20)
    rare = np.full(12, 50.0, dtype=np.float32)
    for i in range(10):
        chunk = rng.standard_normal((200, 12)).astype(np.float32)
        if i == 6:
            chunk[17] = rare
        coreset.add(chunk)
    bank = coreset.finish()
    assert np.linalg.norm(bank - rare, axis=1).min() == 0.0  # kept as a copy: exactly 0 away


def test_finish_without_data_raises() -> None:
    with pytest.raises(ValueError, match="no features"):
        StreamingCoreset(ratio=0.1, max_size=10).finish()


@pytest.mark.parametrize(("ratio", "max_size"), [(0.0, 10), (1.5, 10), (-0.1, 10), (0.5, 0)])
def test_invalid_settings_are_rejected(ratio: float, max_size: int) -> None:
    with pytest.raises(ValueError):
        StreamingCoreset(ratio=ratio, max_size=max_size)


def test_a_large_chunk_is_reduced_in_parts_each_a_coreset_of_its_rows() -> None:
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((2 * PART_ROWS + 10, 8)).astype(np.float32)
    reduced = StreamingCoreset(0.1, 10**6).reduce(chunk, key=3)
    parts = np.array_split(chunk, 3)
    expected = [
        part[np.sort(greedy_coreset(part, round(len(part) * 0.1), seed=3))] for part in parts
    ]
    np.testing.assert_array_equal(reduced, np.concatenate(expected))  # rows copied as they are


def test_far_more_kept_rows_than_the_bank_holds_are_reduced_in_parts_then_cover_every_cluster() -> (
    None
):
    points, labels = _blobs(40, 600, 16, seed=5)  # 24,000 rows, far over 4 x 50
    coreset = StreamingCoreset(ratio=1.0, max_size=50)  # keeps every row, as few-shot does
    for chunk in np.array_split(points, 6):
        coreset.add(chunk)
    assert len(points) > FINISH_FACTOR * 50 and len(points) > 2 * PART_ROWS
    bank = coreset.finish()
    assert len(bank) == 50
    nearest = np.linalg.norm(points[:, None] - bank[None], axis=2).argmin(1)
    covered = {int(labels[np.flatnonzero((points == row).all(1))[0]]) for row in bank}
    assert covered == set(range(40))  # each cluster has a centre in the bank
    assert np.linalg.norm(points - bank[nearest], axis=1).max() < 2.0  # within its cluster
    assert np.array_equal(np.sort(coreset.sources_), coreset.sources_)  # rows stay in order
