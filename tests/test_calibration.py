"""Tests for normalcy.calibration: thresholds that keep their false-positive rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normalcy.calibration import (
    Calibration,
    achieved_rates,
    conformal_threshold,
    min_supported_fpr,
)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.25])
@pytest.mark.parametrize("n", [20, 100, 333])
def test_a_new_normal_score_exceeds_the_threshold_at_most_fpr_of_the_time(
    fpr: float, n: int
) -> None:
    # Over many draws of n calibration scores and one new score from the same distribution,
    # the new score exceeds the threshold with probability at most fpr (split conformal).
    rng = np.random.default_rng(n)
    draws = 4000
    exceeded = 0
    for _ in range(draws):
        scores = rng.standard_normal(n + 1)
        exceeded += scores[-1] > conformal_threshold(scores[:-1], fpr)
    rate = exceeded / draws
    supported = max(fpr, min_supported_fpr(n))
    assert rate <= supported + 3 * math.sqrt(supported / draws)


def test_a_rate_below_what_the_scores_support_gives_the_largest_score() -> None:
    scores = np.array([0.3, 5.0, 1.2, -4.0])
    assert min_supported_fpr(len(scores)) == pytest.approx(0.2)
    # The threshold is one of the scores, selected: compared exactly.
    assert conformal_threshold(scores, 0.0) == 5.0
    assert conformal_threshold(scores, 0.1) == 5.0
    assert conformal_threshold(scores, 0.4) == 1.2  # ceil(5 * 0.6) = 3rd smallest


def test_ties_never_let_more_than_the_rate_through() -> None:
    scores = np.array([1.0, 2.0, 3.0, 3.0, 3.0])
    threshold = conformal_threshold(scores, 0.2)
    assert np.count_nonzero(scores > threshold) <= 1


def test_conformal_threshold_accepts_lists_and_returns_float() -> None:
    threshold = conformal_threshold([1, 2, 3, 4], 0.25)
    assert isinstance(threshold, float) and threshold == 4.0  # ceil(5 * 0.75) = 4th


@pytest.mark.parametrize("fpr", [-0.01, 1.0, 1.5])
def test_fpr_outside_zero_to_one_is_rejected(fpr: float) -> None:
    with pytest.raises(ValueError, match="false-positive rate"):
        conformal_threshold(np.arange(10.0), fpr)


def test_a_threshold_without_scores_is_refused() -> None:
    with pytest.raises(ValueError, match="no normal scores"):
        conformal_threshold(np.array([]), 0.1)


def test_achieved_rates_count_flags_per_class() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.2])
    assert achieved_rates(labels, scores, 0.5) == (0.25, 0.5)
    assert achieved_rates(labels, scores, None) == (None, None)
    assert achieved_rates(np.ones(2), np.ones(2), 0.5) == (None, 1.0)


def test_a_calibration_records_what_its_scores_can_promise() -> None:
    calibration = Calibration.of(99, "left out")
    assert calibration.min_fpr == pytest.approx(0.01)
    assert Calibration(**calibration.to_json()) == calibration
