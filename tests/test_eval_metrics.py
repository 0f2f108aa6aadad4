"""Few-shot metrics and statistics against scikit-learn and SciPy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from cxrtune.errors import TaskError
from cxrtune.evaluate.metrics import (
    accuracy, auroc, batched_accuracy, batched_auroc, batched_f1, f1,
)
from cxrtune.evaluate.stats import (
    bootstrap_ci, compare, paired_tests, summarize, summarize_results,
)


def _random_cases(seed: int, count: int = 20):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        m = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, m)
        labels[0], labels[1] = 0, 1
        # coarse scores make many ties
        scores = rng.integers(0, 5, m).astype(float) if rng.random() < 0.5 else rng.normal(size=m)
        yield labels, scores


def test_auroc_matches_sklearn_with_and_without_ties():
    for labels, scores in _random_cases(0):
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: one half
    assert auroc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0


def test_batched_metrics_match_sklearn_on_padded_rows():
    cases = list(_random_cases(1, 12))
    width = max(len(l) for l, _ in cases)
    scores = torch.zeros(len(cases), width, dtype=torch.float64)
    labels = torch.zeros(len(cases), width, dtype=torch.bool)
    mask = torch.zeros(len(cases), width, dtype=torch.bool)
    for i, (l, s) in enumerate(cases):
        scores[i, : len(l)] = torch.from_numpy(s)
        labels[i, : len(l)] = torch.from_numpy(l.astype(bool))
        mask[i, : len(l)] = True
        scores[i, len(l):] = -5.0  # padding must not count, whatever its value
        labels[i, len(l):] = True
    got_auc = batched_auroc(scores, labels, mask)
    predictions = scores > 1.0
    got_acc = batched_accuracy(predictions, labels, mask)
    got_f1 = batched_f1(predictions, labels, mask)
    for i, (l, s) in enumerate(cases):
        assert got_auc[i].item() == pytest.approx(roc_auc_score(l, s), abs=1e-12)
        assert got_acc[i].item() == pytest.approx(accuracy_score(l, s > 1.0))
        assert got_f1[i].item() == pytest.approx(f1_score(l, s > 1.0, zero_division=0))
        assert accuracy(l, s > 1.0) == pytest.approx(accuracy_score(l, s > 1.0))
        assert f1(l, s > 1.0) == pytest.approx(f1_score(l, s > 1.0, zero_division=0))


def test_auroc_refuses_a_test_set_without_positives_or_with_nan():
    with pytest.raises(TaskError, match="0 positives"):
        auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(TaskError, match="NaN"):
        auroc([0, 1, 1], [0.1, float("nan"), 0.3])


def test_summary_and_bootstrap_ci_agree_with_scipy():
    values = np.random.default_rng(3).normal(0.7, 0.05, size=10)
    s = summarize(values, seed=1)
    assert s["mean"] == pytest.approx(values.mean())
    assert s["std"] == pytest.approx(np.std(values, ddof=1))
    assert summarize(values, seed=1) == s  # seeded: repeats exactly
    reference = scipy_stats.bootstrap((values,), np.mean, method="percentile", n_resamples=10_000,
                                      random_state=5).confidence_interval
    spread = values.std(ddof=1) / np.sqrt(len(values))
    assert s["ci_low"] == pytest.approx(reference.low, abs=0.1 * spread)
    assert s["ci_high"] == pytest.approx(reference.high, abs=0.1 * spread)
    assert s["ci_low"] < s["mean"] < s["ci_high"]
    assert bootstrap_ci([0.6]) == (0.6, 0.6)
    for confidence, resamples, seed in ((0.95, 10_000, 1), (0.8, 2_000, 7)):  # the settings reach scipy
        same = scipy_stats.bootstrap((values,), np.mean, method="percentile", n_resamples=resamples,
                                     confidence_level=confidence, rng=np.random.default_rng(seed)).confidence_interval
        assert bootstrap_ci(values, confidence, resamples, seed) == pytest.approx((same.low, same.high), rel=1e-12)
    assert (s["ci_low"], s["ci_high"]) == bootstrap_ci(values, seed=1)


def test_paired_tests_match_scipy_and_handle_identical_pairs():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 0.7, 10)
    method = base + rng.normal(0.03, 0.02, 10)
    got = paired_tests(method, base)
    assert got["t_pvalue"] == pytest.approx(scipy_stats.ttest_rel(method, base).pvalue)
    assert got["wilcoxon_pvalue"] == pytest.approx(scipy_stats.wilcoxon(method, base).pvalue)
    assert got["mean_difference"] == pytest.approx((method - base).mean())
    same = paired_tests(base, base)
    assert same["t_pvalue"] == 1.0 and same["wilcoxon_pvalue"] == 1.0
    with pytest.raises(TaskError, match="at least 2"):
        paired_tests([0.5], [0.6])


def test_compare_pairs_per_disease_means_over_trials():
    rng = np.random.default_rng(5)
    rows = []
    for backbone, shift in (("ssl", 0.05), ("imagenet", 0.0)):
        for d in range(6):
            for shots in (1, 5):
                for trial in range(3):
                    rows.append({"backbone": backbone, "evaluator": "probe", "disease": f"d{d}",
                                 "shots": shots, "trial": trial,
                                 "auroc": 0.6 + shift + 0.01 * d + rng.normal(0, 0.01)})
    results = pd.DataFrame(rows)
    table = compare(results, "ssl", "imagenet", "probe").set_index("shots")
    for shots in (1, 5):
        a = results[(results.backbone == "ssl") & (results.shots == shots)].groupby("disease").auroc.mean()
        b = results[(results.backbone == "imagenet") & (results.shots == shots)].groupby("disease").auroc.mean()
        assert table.loc[shots, "method_mean"] == pytest.approx(a.mean())
        assert table.loc[shots, "t_pvalue"] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    summary = summarize_results(results, resamples=200)
    assert len(summary) == 2 * 6 * 2 and (summary["n"] == 3).all()
