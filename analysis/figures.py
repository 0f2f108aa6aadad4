"""The report's figures. Each function returns a matplotlib Figure sized for the page it is
embedded in (about 1,100 px wide at 100 dpi): labelled axes with units, a legend, and the report's
single palette (:mod:`cxrtune.analysis.palette`) so one backbone has one colour everywhere."""

from __future__ import annotations

import math
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrtune.analysis.palette import status_colour  # noqa: E402

plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
                     "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100})
WIDTH = 11.0  # inches at 100 dpi: the report's content width


def _panels(n: int, per_row: int = 3, height: float = 3.6):
    cols = min(n, per_row)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def shot_curves(summary: pd.DataFrame, colours: dict[str, str]) -> plt.Figure:
    """Mean AUROC over findings vs shots (log x), 95 % CI band, one panel per evaluator."""
    evaluators = sorted(summary["evaluator"].unique())
    fig, axes = _panels(len(evaluators), per_row=2, height=4.0)
    for ax, evaluator in zip(axes, evaluators):
        part = summary[summary["evaluator"] == evaluator]
        for backbone, line in part.groupby("backbone", sort=True):
            line = line.sort_values("shots")
            colour = colours[backbone]
            ax.plot(line["shots"], line["mean"], marker="o", color=colour, label=backbone, lw=2)
            ax.fill_between(line["shots"], line["ci_low"], line["ci_high"], color=colour, alpha=0.18, lw=0)
        ax.axhline(0.5, color="#999999", ls=":", lw=1, label="chance (0.5)")
        ax.set_xscale("log")
        shots = sorted(part["shots"].unique())
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.minorticks_off()
        ax.set_xlabel("training shots per class (log scale)")
        ax.set_ylabel("mean AUROC over findings")
        ax.set_title(f"{evaluator}: AUROC vs shots (bands: 95% CI over findings)")
        ax.legend(loc="best", frameon=False)
    fig.tight_layout()
    return fig


def disease_heatmaps(per_disease: dict[tuple[str, str], pd.DataFrame]) -> plt.Figure:
    """One disease x shots panel per (backbone, evaluator), values printed in the cells; panels in a
    row share the finding axis (labelled once, on the left)."""
    keys = list(per_disease)
    findings = sorted(set().union(*(t.index for t in per_disease.values())))
    shots = sorted(set().union(*(t.columns for t in per_disease.values())))
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, rows * (0.3 * len(findings) + 1.3)), squeeze=False,
                             sharey=True, layout="constrained")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        table = per_disease[key].reindex(index=findings, columns=shots)
        values = table.to_numpy(dtype=float)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdBu", aspect="auto")  # white = chance (0.5)
        ax.set_xticks(range(len(shots)), [str(c) for c in shots])
        ax.set_yticks(range(len(findings)), findings, fontsize=9)
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(value - 0.5) > 0.3 else "black")
        ax.set_xlabel("training shots per class")
        ax.set_title(f"{key[0]}\n{key[1]}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.9, label="mean AUROC over trials (red: below chance 0.5)")
    return fig


def _log_axis(ax, low: float | None, high: float | None) -> None:
    """Log x with plain-number labels at 1, 2, 5 x 10^k (matplotlib's default crowds a short range)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    if low and high:
        ax.set_xlim(low / 1.15, high * 1.15)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def search_progress(trials: pd.DataFrame, objective: str) -> plt.Figure:
    """Objective per trial (in start order, coloured by status) and the best so far."""
    fig, ax = plt.subplots(figsize=(WIDTH / 2, 3.8))
    x = np.arange(1, len(trials) + 1)
    values = trials["objective"].astype(float).to_numpy()
    best = pd.Series(values).cummax().to_numpy()
    ax.step(x, best, where="post", color="#333333", lw=2, label="best so far")
    for status in sorted(trials["status"].unique()):
        sel = (trials["status"] == status).to_numpy()
        ax.scatter(x[sel], values[sel], color=status_colour(status), s=40, zorder=3, label=status)
    ax.set_xlabel("trial (in order of start)")
    ax.set_ylabel(f"{objective} (AUROC)")
    ax.set_title("Search progress")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def importance_bars(importances: dict[str, float]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(WIDTH / 2, 0.5 * len(importances) + 1.6))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="#0072B2")
    ax.set_xlabel("importance (share of objective variance, fANOVA)")
    ax.set_title("Parameter importance (Optuna)")
    fig.tight_layout()
    return fig


def objective_vs_params(trials: pd.DataFrame, searched: dict[str, dict[str, Any]], objective: str) -> plt.Figure:
    fig, axes = _panels(len(searched), per_row=3, height=3.4)
    for ax, (name, dist) in zip(axes, searched.items()):
        for status in sorted(trials["status"].unique()):
            part = trials[trials["status"] == status]
            ax.scatter(part[name].astype(float), part["objective"].astype(float), color=status_colour(status),
                       s=40, label=status)
        if dist.get("log"):
            _log_axis(ax, dist.get("low"), dist.get("high"))
        elif dist.get("low") is not None and dist.get("high") is not None:
            pad = 0.05 * (dist["high"] - dist["low"])
            ax.set_xlim(dist["low"] - pad, dist["high"] + pad)
        ax.set_xlabel(f"{name}{' (log scale)' if dist.get('log') else ''}; axis = searched range", fontsize=10)
        ax.set_ylabel(f"{objective} (AUROC)")
    axes[0].legend(frameon=False, title="final status")
    fig.tight_layout()
    return fig


def training_health(history: pd.DataFrame, status_of: dict[str, str]) -> plt.Figure:
    """Per-epoch feature std, effective rank and SSL loss per trial, coloured by final status."""
    panels = [("feature_std", "feature std (eval-mode, unitless)"), ("effective_rank", "effective rank (dimensions)"),
              ("ssl_loss", "SSL loss (method's units)")]
    fig, axes = _panels(len(panels), per_row=3, height=3.6)
    seen = set()
    for ax, (key, label) in zip(axes, panels):
        for trial, part in history.groupby("trial", sort=True):
            status = status_of.get(trial, "running")
            part = part.sort_values("epoch")
            ax.plot(part["epoch"], part[key].astype(float), marker="o", ms=3, color=status_colour(status), alpha=0.85,
                    label=status if status not in seen else None)
            seen.add(status)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(frameon=False, title="final status")
    fig.tight_layout()
    return fig


def cost_bars(trials: pd.DataFrame) -> plt.Figure:
    fig, axes = _panels(2, per_row=2, height=max(3.0, 0.28 * len(trials) + 1.5))
    labels = trials["trial"].astype(str).tolist()
    colours = [status_colour(s) for s in trials["status"]]
    axes[0].barh(labels, trials["wall_time_s"].astype(float) / 60.0, color=colours)
    axes[0].set_xlabel("wall time (minutes)")
    axes[0].set_ylabel("trial")
    axes[1].barh(labels, trials["images_per_s"].astype(float), color=colours)
    axes[1].set_xlabel("training throughput (images/s, mean over epochs)")
    for ax in axes:
        ax.invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=status_colour(s)) for s in sorted(trials["status"].unique())]
    axes[1].legend(handles, sorted(trials["status"].unique()), frameon=False, title="final status",
                   loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def localisation_bars(summary: pd.DataFrame, colours: dict[str, str]) -> plt.Figure:
    """Pointing-game hit rate and energy share per finding and backbone, with 95 % CIs."""
    findings = sorted(summary["finding"].unique())
    backbones = sorted(summary["backbone"].unique())
    fig, axes = _panels(2, per_row=2, height=max(3.4, 0.42 * len(findings) * max(1, len(backbones) / 2) + 1.5))
    width = 0.8 / len(backbones)
    for ax, (key, low, high, label) in zip(axes, [("hit_rate", "hit_ci_low", "hit_ci_high", "pointing-game hit rate"),
                                                  ("energy", "energy_ci_low", "energy_ci_high",
                                                   "share of heatmap energy inside the region")]):
        for k, backbone in enumerate(backbones):
            part = summary[summary["backbone"] == backbone].set_index("finding").reindex(findings)
            y = np.arange(len(findings)) + (k - (len(backbones) - 1) / 2) * width
            err = np.vstack([part[key] - part[low], part[high] - part[key]]).clip(0)
            ax.barh(y, part[key], height=width, color=colours[backbone], xerr=err, capsize=2, label=backbone)
        if key == "energy":
            chance = summary.groupby("finding")["chance"].mean().reindex(findings)
            ax.scatter(chance, np.arange(len(findings)), marker="|", s=200, color="black", zorder=4,
                       label="chance (region's area)")
        ax.set_yticks(np.arange(len(findings)), findings)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"{label} (0-1)")
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    axes[0].legend(frameon=False, loc="lower right", fontsize=9)
    axes[1].legend(frameon=False, loc="lower right", fontsize=9)
    fig.tight_layout()
    return fig


def gradcam_panels(examples: dict[str, dict[str, Any]], entries, colours: dict[str, str]) -> plt.Figure:
    """Per finding: the image, its ground truth, and each backbone's heatmap over the image (the
    ground truth's outline drawn on every panel). Absent backbones get a panel saying why."""
    findings = sorted(examples)
    cols = 2 + len(entries)
    fig, axes = plt.subplots(len(findings), cols, figsize=(WIDTH, 2.3 * len(findings) + 0.4), squeeze=False)
    for r, finding in enumerate(findings):
        ex = examples[finding]
        image, mask = ex["image"], ex["mask"]
        axes[r][0].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_ylabel(finding, fontsize=10)
        axes[r][1].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[r][1].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.45)
        for c, entry in enumerate(entries, start=2):
            ax = axes[r][c]
            heat = ex["maps"].get(entry.label)
            if heat is None:
                ax.imshow(np.full(image.shape, 240, np.uint8), cmap="gray", vmin=0, vmax=255)
                ax.text(0.5, 0.5, "absent\n" + "\n".join(textwrap.wrap(entry.note.split(": ", 1)[-1], 18)),
                        ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255)
                ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
                ax.contour(mask, levels=[0.5], colors="white", linewidths=1)
                y, x = np.unravel_index(np.argmax(heat), heat.shape)
                ax.plot(x, y, marker="x", color="white", ms=8, mew=2)
        for c, title in enumerate(["image", "ground truth"] + [e.label for e in entries]):
            if r == 0:
                axes[r][c].set_title(title, fontsize=10, color=colours.get(title, "black"))
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    fig.tight_layout()
    return fig
