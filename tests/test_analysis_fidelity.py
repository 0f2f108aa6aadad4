"""Rung fidelity on curves with known answers: Spearman per rung with its CI, and the decisions,
regret and compute of successive halving worked by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrtune.analysis.fidelity import rung_correlations, rungs, spearman_ci, successive_halving


def _curves(by_epoch: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"trial": t, "epoch": e, "objective": v}
                         for e, values in by_epoch.items() for t, v in enumerate(values)])


def test_rung_epochs_follow_grace_and_reduction():
    assert rungs(1, 3, 9) == [1, 3, 9]
    assert rungs(1, 3, 10) == [1, 3, 9, 10]
    assert rungs(2, 2, 12) == [2, 4, 8, 12]
    with pytest.raises(ValueError, match="grace period >= 1"):
        rungs(0, 3, 9)


def test_spearman_per_rung_on_known_rankings():
    final = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75]
    curves = _curves({1: final[::-1],                             # ranking reversed
                      3: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],          # same ranking, other values
                      9: final})
    table = rung_correlations(curves, [1, 3])
    assert table["spearman"].tolist() == pytest.approx([-1.0, 1.0])
    assert table["trials"].tolist() == [6, 6]
    # every resample of a perfect (anti-)correlation is perfect: the CI is the point
    assert table["ci_low"].tolist() == pytest.approx([-1.0, 1.0])
    assert table["ci_high"].tolist() == pytest.approx([-1.0, 1.0])
    assert rung_correlations(curves)["epoch"].tolist() == [1, 3]   # every epoch before the final one


def test_spearman_ci_covers_a_known_correlation_and_narrows_with_trials():
    rng = np.random.default_rng(0)
    widths = []
    for n in (12, 200):
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)          # Pearson 1/sqrt(2): Spearman (6/pi) asin(r/2) = 0.690
        rho, low, high = spearman_ci(x, y, resamples=500)
        assert low <= rho <= high and low < 0.690 < high
        widths.append(high - low)
    assert 0.5 < low and high < 0.8         # the large sample pins it down
    assert widths[1] < widths[0] / 2
    assert np.isnan(spearman_ci([1, 2], [2, 1])[0])   # two pairs: no correlation to speak of


def test_successive_halving_worked_by_hand():
    # 9 trials, grace 1, eta 3, final epoch 9: rung 1 keeps 3, rung 3 keeps 1
    e1 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]    # trials 0, 1, 2 go on
    e3 = [0.5, 0.7, 0.6, 0, 0, 0, 0, 0, 0]                 # trial 1 goes on
    e9 = [0.60, 0.65, 0.70, 0.9, 0, 0, 0, 0, 0]             # trial 3, stopped at rung 1, would have won
    out = successive_halving(_curves({1: e1, 3: e3, 9: e9}), grace=1, eta=3)
    assert out.rungs == [1, 3, 9]
    assert out.kept == {1: list(range(9)), 3: [0, 1, 2], 9: [1]}
    assert (out.pick, out.best, out.kept_best) == (1, 3, False)
    assert out.regret == pytest.approx(0.9 - 0.65)
    assert out.epochs_spent == 9 * 1 + 3 * 2 + 1 * 6 and out.epochs_full == 81
    # a cooldown of 20 % of the epochs done at every judgement
    costly = successive_halving(_curves({1: e1, 3: e3, 9: e9}), 1, 3, judge_cost=lambda r: 0.2 * r)
    assert costly.epochs_spent == pytest.approx(21 + 9 * 0.2 + 3 * 0.6 + 1 * 1.8)
    # a loss: lower is better
    low = successive_halving(_curves({1: e1, 3: e3, 9: e9}), 1, 3, mode="min")
    assert low.kept[3] == [8, 7, 6] and low.best in (4, 5, 6, 7, 8)
