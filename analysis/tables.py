"""The study's tables as data frames: mean AUROC by shots per backbone x evaluator with 95 % CIs
and paired p-values against each baseline.

The summary of one (backbone, evaluator, shots) cell is the study's: the mean over diseases of the
per-disease mean AUROC over trials (:func:`cxrtune.evaluate.stats.disease_means`). Its 95 % CI is a
percentile bootstrap over the diseases (the per-disease means are the units the paired tests use
too), from :func:`cxrtune.evaluate.stats.bootstrap_ci`. P-values are those of
:func:`cxrtune.evaluate.stats.compare`: paired t-test and Wilcoxon over the per-disease means.
"""

from __future__ import annotations

import math

import pandas as pd

from cxrtune.evaluate.stats import bootstrap_ci, compare, disease_means

BASELINE_INITS = ("random", "imagenet")


def baselines_of(results: pd.DataFrame) -> list[str]:
    """Backbones that are baselines: ``init`` random/imagenet, or named so (``random-resnet18``)."""
    names = sorted(set(results["backbone"].astype(str)))
    if "init" in results.columns:
        inits = results.groupby("backbone")["init"].first().astype(str)
        found = [b for b in names if inits.get(b) in BASELINE_INITS]
        if found:
            return found
    return [b for b in names if b.split("-")[0].lower() in BASELINE_INITS]


def study_summary(results: pd.DataFrame, metric: str = "auroc", seed: int = 0) -> pd.DataFrame:
    """Long table: one row per (backbone, evaluator, shots) with ``mean, ci_low, ci_high, diseases``
    and, per baseline B, ``t_pvalue_vs_B`` and ``wilcoxon_pvalue_vs_B`` (NaN against itself or where
    fewer than two diseases pair up)."""
    baselines = baselines_of(results)
    rows = []
    for (backbone, evaluator), _ in results.groupby(["backbone", "evaluator"], sort=True):
        per_disease = disease_means(results, backbone, evaluator, metric)
        tests = {}
        for baseline in baselines:
            if baseline == backbone or not ((results["backbone"] == baseline) & (results["evaluator"] == evaluator)).any():
                continue
            tests[baseline] = compare(results, backbone, baseline, evaluator, metric).set_index("shots") \
                if len(per_disease) > 1 else pd.DataFrame()
        for shots in per_disease.columns:
            values = per_disease[shots].dropna().to_numpy()
            low, high = bootstrap_ci(values, seed=seed)
            row = {"backbone": backbone, "evaluator": evaluator, "shots": int(shots), "mean": float(values.mean()),
                   "ci_low": low, "ci_high": high, "diseases": int(values.size)}
            for baseline in baselines:
                table = tests.get(baseline)
                found = table is not None and not table.empty and int(shots) in table.index
                row[f"t_pvalue_vs_{baseline}"] = float(table.loc[int(shots), "t_pvalue"]) if found else math.nan
                row[f"wilcoxon_pvalue_vs_{baseline}"] = float(table.loc[int(shots), "wilcoxon_pvalue"]) if found else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def disease_shots_table(results: pd.DataFrame, backbone: str, evaluator: str, metric: str = "auroc") -> pd.DataFrame:
    """Per-disease mean over trials (disease x shots), for the heatmap."""
    return disease_means(results, backbone, evaluator, metric)


def fmt(value: float, digits: int = 3) -> str:
    """How every number of the report is printed: fixed decimals, an en dash for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def fmt_p(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def wide_study_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Display form: one row per backbone x evaluator, per shots a cell ``mean [low, high]``, and
    one row per baseline with ``t p / Wilcoxon p`` per shots."""
    if summary.empty:
        return pd.DataFrame()
    shots = sorted(summary["shots"].unique())
    baselines = [c[len("t_pvalue_vs_"):] for c in summary.columns if c.startswith("t_pvalue_vs_")]
    out = []
    for (backbone, evaluator), part in summary.groupby(["backbone", "evaluator"], sort=True):
        part = part.set_index("shots")
        row = {"backbone": backbone, "evaluator": evaluator, "statistic": "mean AUROC [95% CI]"}
        for s in shots:
            row[f"{s}-shot"] = (f"{fmt(part.loc[s, 'mean'])} [{fmt(part.loc[s, 'ci_low'])}, {fmt(part.loc[s, 'ci_high'])}]"
                                if s in part.index else "–")
        out.append(row)
        for baseline in baselines:
            if baseline == backbone or part[f"t_pvalue_vs_{baseline}"].isna().all():
                continue
            row = {"backbone": backbone, "evaluator": evaluator, "statistic": f"p vs {baseline} (t / Wilcoxon)"}
            for s in shots:
                row[f"{s}-shot"] = (f"{fmt_p(part.loc[s, f't_pvalue_vs_{baseline}'])} / "
                                    f"{fmt_p(part.loc[s, f'wilcoxon_pvalue_vs_{baseline}'])}" if s in part.index else "–")
            out.append(row)
    return pd.DataFrame(out)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of the cells as formatted (``disable_numparse``: "0.500"
    stays "0.500")."""
    if frame.empty:
        return "(empty)\n"
    return frame.astype(str).to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n"
