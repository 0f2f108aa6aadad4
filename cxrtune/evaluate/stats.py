"""Summaries over trials and paired comparisons over diseases, as the study reported them.

Per (disease, shots): mean, sample standard deviation (ddof = 1) and a seeded percentile-bootstrap
95 % confidence interval of the mean over the trials. Method vs baseline: the per-disease mean
AUROCs of the two form pairs (one per disease); the study used a paired t-test over those pairs, and
a Wilcoxon signed-rank test is added because ten pairs are too few to trust normality.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from cxrtune.errors import TaskError

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95


def bootstrap_ci(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean (``scipy.stats.bootstrap``); the same seed gives the
    same interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise TaskError("bootstrap_ci: no values to summarise")
    if values.size == 1:  # scipy needs two values to resample; one value has no spread
        return float(values[0]), float(values[0])
    interval = scipy_stats.bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=confidence,
                                     method="percentile", vectorized=True,
                                     rng=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def summarize(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE,
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, float]:
    """``{n, mean, std, ci_low, ci_high}`` of one (disease, shots) cell's trial values."""
    values = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(values, confidence, resamples, seed)
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
        "ci_low": low,
        "ci_high": high,
    }


def paired_tests(method: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of ``method`` vs ``baseline`` (two-sided).

    Identical pairs leave the Wilcoxon test undefined; its p-value is then reported as 1.0.
    """
    a = np.asarray(method, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise TaskError(f"paired_tests: method {a.shape} and baseline {b.shape} must be 1-d and paired")
    if a.size < 2:
        raise TaskError(f"paired_tests: {a.size} pair(s) given; a paired test needs at least 2")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise TaskError("paired_tests: a value is NaN or infinite")
    diff = a - b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = scipy_stats.ttest_rel(a, b)
        t_stat, t_p = float(t.statistic), float(t.pvalue)
    if np.all(diff == 0):
        t_stat, t_p = 0.0, 1.0
        w_stat, w_p = 0.0, 1.0
    else:
        w = scipy_stats.wilcoxon(a, b)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    return {
        "n_pairs": int(a.size),
        "mean_difference": float(diff.mean()),
        "t_statistic": t_stat,
        "t_pvalue": t_p,
        "wilcoxon_statistic": w_stat,
        "wilcoxon_pvalue": w_p,
    }


GROUP = ["backbone", "evaluator", "disease", "shots"]


def summarize_results(results: pd.DataFrame, metric: str = "auroc", seed: int = 0,
                      resamples: int = DEFAULT_RESAMPLES) -> pd.DataFrame:
    """One row per (backbone, evaluator, disease, shots): mean, std and CI over trials."""
    rows = []
    for key, group in results.groupby(GROUP, sort=True):
        rows.append({**dict(zip(GROUP, key)), **summarize(group[metric].to_numpy(), seed=seed,
                                                           resamples=resamples)})
    return pd.DataFrame(rows, columns=GROUP + ["n", "mean", "std", "ci_low", "ci_high"])


def disease_means(results: pd.DataFrame, backbone: str, evaluator: str, metric: str = "auroc") -> pd.DataFrame:
    """Per-disease mean over trials, as a (disease x shots) table."""
    part = results[(results["backbone"] == backbone) & (results["evaluator"] == evaluator)]
    if part.empty:
        known = sorted(set(zip(results["backbone"], results["evaluator"])))
        raise TaskError(f"no results for backbone {backbone!r} with evaluator {evaluator!r}; have {known}")
    return part.groupby(["disease", "shots"])[metric].mean().unstack("shots")


def compare(results: pd.DataFrame, method: str, baseline: str, evaluator: str,
            metric: str = "auroc", baseline_evaluator: str | None = None) -> pd.DataFrame:
    """Per shot count: mean of per-disease means for both, and the paired tests over diseases."""
    a = disease_means(results, method, evaluator, metric)
    b = disease_means(results, baseline, baseline_evaluator or evaluator, metric)
    rows = []
    for shots in sorted(set(a.columns) & set(b.columns)):
        pairs = pd.concat([a[shots], b[shots]], axis=1, keys=["m", "b"]).dropna()
        if len(pairs) < 2:
            continue
        tests = paired_tests(pairs["m"].to_numpy(), pairs["b"].to_numpy())
        rows.append({"shots": int(shots), "method_mean": float(pairs["m"].mean()),
                     "baseline_mean": float(pairs["b"].mean()), **tests})
    return pd.DataFrame(rows)
