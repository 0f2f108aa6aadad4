"""The study table of the report against independent computations (pandas loops, scipy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from _analysis_fixtures import results_table
from cxrtune.analysis.palette import palette
from cxrtune.analysis.tables import baselines_of, study_summary, wide_study_table


def test_summary_means_cis_and_pvalues_match_an_independent_computation():
    results = results_table()
    summary = study_summary(results)
    assert baselines_of(results) == ["random-resnet18"]
    for (backbone, evaluator, shots), part in results.groupby(["backbone", "evaluator", "shots"]):
        per_disease = {d: g["auroc"].mean() for d, g in part.groupby("disease")}
        row = summary[(summary.backbone == backbone) & (summary.evaluator == evaluator) & (summary.shots == shots)].iloc[0]
        assert row["mean"] == pytest.approx(np.mean(list(per_disease.values())), abs=1e-12)
        assert row["diseases"] == 4
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
        base = results[(results.backbone == "random-resnet18") & (results.evaluator == evaluator) & (results.shots == shots)]
        base_means = [base[base.disease == d]["auroc"].mean() for d in sorted(per_disease)]
        mine = [per_disease[d] for d in sorted(per_disease)]
        if backbone == "random-resnet18":
            assert np.isnan(row["t_pvalue_vs_random-resnet18"])
        else:
            assert row["t_pvalue_vs_random-resnet18"] == pytest.approx(stats.ttest_rel(mine, base_means).pvalue)
            assert row["wilcoxon_pvalue_vs_random-resnet18"] == pytest.approx(stats.wilcoxon(mine, base_means).pvalue)


def test_bootstrap_ci_is_over_diseases_and_shrinks_to_the_value_when_diseases_agree():
    results = results_table()
    results["auroc"] = 0.7  # every disease has the same mean: no spread to resample
    summary = study_summary(results)
    assert np.allclose(summary[["mean", "ci_low", "ci_high"]].to_numpy(), 0.7)


def test_wide_table_prints_each_cell_as_mean_and_ci():
    summary = study_summary(results_table())
    wide = wide_study_table(summary)
    cell = wide[(wide.backbone == "moco_variance") & (wide.evaluator == "probe") & (wide.statistic == "mean AUROC [95% CI]")]
    row = summary[(summary.backbone == "moco_variance") & (summary.evaluator == "probe") & (summary.shots == 5)].iloc[0]
    assert cell["5-shot"].iloc[0] == f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    assert (wide.statistic == "p vs random-resnet18 (t / Wilcoxon)").sum() == 4  # 2 methods x 2 evaluators


def test_palette_gives_each_name_one_stable_colour_and_baselines_fixed_ones():
    names = ["moco_variance", "barlow_lambda", "random-resnet18", "imagenet-resnet50", "spark_mask"]
    first, second = palette(names), palette(list(reversed(names)))
    assert first == second
    assert len(set(first.values())) == len(names)
    assert first["random-resnet18"] == palette(["random-resnet50"])["random-resnet50"]
    assert first["imagenet-resnet50"] != first["random-resnet18"]


def test_figures_share_one_colour_per_backbone_and_colour_trials_by_status():
    import matplotlib.colors as mcolors

    from cxrtune.analysis import figures
    from cxrtune.analysis.palette import status_colour

    summary = study_summary(results_table())
    colours = palette(set(summary["backbone"]))
    fig = figures.shot_curves(summary, colours)
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in colours:
                assert mcolors.to_hex(line.get_color()) == colours[line.get_label()].lower()
        assert ax.get_xscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    local = pd.DataFrame({"finding": ["mass", "mass"], "backbone": ["moco_variance", "random-resnet18"],
                          "hit_rate": [0.5, 0.2], "hit_ci_low": [0.3, 0.1], "hit_ci_high": [0.7, 0.3],
                          "energy": [0.4, 0.1], "energy_ci_low": [0.3, 0.0], "energy_ci_high": [0.5, 0.2],
                          "chance": [0.05, 0.05]})
    bars = figures.localisation_bars(local, colours)
    bar_colours = {c.get_label(): mcolors.to_hex(c.patches[0].get_facecolor())
                   for c in bars.axes[0].containers if hasattr(c, "patches")}
    assert bar_colours == {name: colours[name].lower() for name in ("moco_variance", "random-resnet18")}
    history = pd.DataFrame({"trial": ["a", "a", "b", "b"], "epoch": [1, 2, 1, 2], "feature_std": [0.5, 0.5, 0.5, 0.01],
                            "effective_rank": [9, 9, 9, 1], "ssl_loss": [5, 4, 5, 3]})
    health = figures.training_health(history, {"a": "completed", "b": "collapsed"})
    for ax in health.axes:
        got = [mcolors.to_hex(line.get_color()) for line in ax.get_lines()]
        assert got == [status_colour("completed").lower(), status_colour("collapsed").lower()]
