"""How far a sweep's early judgements can be trusted: rung objectives against final objectives.

The input is a table of learning curves, one row per (trial, epoch) with the objective measured at
that epoch (``curves``: columns ``trial``, ``epoch``, ``objective``), from trials that all trained
to the same final epoch (a benchmark's grid, or a sweep's audit trials). From it:

- :func:`rung_correlations`: per rung, the Spearman correlation between the trials' objective at
  the rung and at the final epoch, with a percentile bootstrap CI over trials;
- :func:`successive_halving`: the decisions successive halving (ASHA run synchronously) takes on
  these curves with grace period ``g`` and reduction factor ``eta``: who is kept at each rung, the
  trial it would pick, the compute it spends, and its regret (best final objective minus the
  final objective of its pick).

Higher objectives are better (``mode="max"``); pass ``mode="min"`` for losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats

from cxrtune.plan import asha_rungs as rungs  # noqa: F401  (ASHA's rung epochs, here with the analysis)


def _check(curves: pd.DataFrame) -> pd.DataFrame:
    missing = {"trial", "epoch", "objective"} - set(curves.columns)
    if missing:
        raise ValueError(f"curves lacks the column(s) {sorted(missing)}: need trial, epoch, objective")
    return curves


def objective_at(curves: pd.DataFrame, epoch: int) -> pd.Series:
    """Each trial's objective at ``epoch`` (trials without a value there are left out)."""
    rows = _check(curves)[curves["epoch"] == epoch]
    return rows.groupby("trial")["objective"].last().dropna()


def final_epoch(curves: pd.DataFrame) -> int:
    """The last epoch every trial reached."""
    return int(_check(curves).groupby("trial")["epoch"].max().min())


def spearman_ci(x: np.ndarray, y: np.ndarray, *, resamples: int = 2000, level: float = 0.95,
                seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of paired ``x``, ``y`` with a percentile bootstrap CI over the pairs.

    Resamples whose ``x`` or ``y`` is constant (no ranking to correlate) are left out. With fewer
    than three pairs everything is NaN.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3:
        return math.nan, math.nan, math.nan
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    values = []
    for idx in draws:
        xs, ys = x[idx], y[idx]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:
            continue
        values.append(stats.spearmanr(xs, ys).statistic)
    if not values:
        return rho, math.nan, math.nan
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return rho, float(low), float(high)


def rung_correlations(curves: pd.DataFrame, at: list[int] | None = None, *, seed: int = 0) -> pd.DataFrame:
    """Per epoch in ``at`` (default: every epoch before the final one): Spearman's rho between the
    objective there and at the final epoch, its 95 % bootstrap CI, and how many trials it rests on."""
    last = final_epoch(curves)
    final = objective_at(curves, last)
    epochs = sorted(int(e) for e in curves["epoch"].unique() if e < last) if at is None else list(at)
    rows = []
    for epoch in epochs:
        early = objective_at(curves, epoch)
        both = pd.concat([early, final], axis=1, keys=["early", "final"]).dropna()
        rho, low, high = spearman_ci(both["early"].to_numpy(), both["final"].to_numpy(), seed=seed)
        rows.append({"epoch": epoch, "spearman": rho, "ci_low": low, "ci_high": high, "trials": len(both)})
    return pd.DataFrame(rows, columns=["epoch", "spearman", "ci_low", "ci_high", "trials"])


@dataclass
class HalvingOutcome:
    """What successive halving decided on a set of curves."""

    rungs: list[int]
    kept: dict[int, list]              # rung epoch -> trials that reached it
    pick: object                       # the trial with the best objective at the last rung
    best: object                       # the trial with the best final objective
    regret: float                      # final objective of ``best`` minus that of ``pick`` (>= 0)
    epochs_spent: float                # epochs trained by all trials together (judgements included)
    epochs_full: int                   # epochs of training every trial to the end, no judgement cost
    kept_best: bool = field(init=False)

    def __post_init__(self) -> None:
        self.kept_best = self.pick == self.best

    @property
    def compute_share(self) -> float:
        return self.epochs_spent / self.epochs_full


def successive_halving(curves: pd.DataFrame, grace: int, eta: int = 3, mode: str = "max",
                       judge_cost: Callable[[int], float] | None = None) -> HalvingOutcome:
    """Successive halving on recorded curves: every trial trains to ``grace`` epochs; at each rung
    the best ``1/eta`` (at least one) go on to the next rung; the last rung is the final epoch.
    ``judge_cost(rung)``: the epochs one judgement at ``rung`` costs beyond the training (a
    cooldown branch of a wsd run: ``cooldown_fraction * rung``), counted for every trial judged.

    This is ASHA's rule with every trial present at every rung (ASHA itself promotes as results
    arrive, so with trials started late it can keep a few more): the decisions it takes on
    trials whose judgements do not depend on how long they would train.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode = {mode!r}: use 'max' or 'min'")
    sign = 1.0 if mode == "max" else -1.0
    last = final_epoch(curves)
    steps = rungs(grace, eta, last)
    alive = list(objective_at(curves, steps[0]).index)
    kept: dict[int, list] = {}
    spent, previous = 0.0, 0
    for i, rung in enumerate(steps):
        spent += len(alive) * (rung - previous + (judge_cost(rung) if judge_cost else 0.0))
        previous = rung
        kept[rung] = list(alive)
        if i + 1 < len(steps):
            scores = objective_at(curves, rung).reindex(alive) * sign
            keep = max(1, len(alive) // eta)
            alive = list(scores.sort_values(ascending=False, kind="stable").index[:keep])
    final = objective_at(curves, last) * sign
    pick = final.reindex(kept[steps[-1]]).idxmax()
    best = final.idxmax()
    regret = float(final[best] - final[pick])
    return HalvingOutcome(steps, kept, pick, best, regret, spent, len(final) * last)


# -- a sweep's own audit ------------------------------------------------------------------------------
def judged_curves(history: pd.DataFrame, objective: str) -> pd.DataFrame:
    """A sweep's learning curves from its report history (the report's ``history`` table): the
    objective at each epoch where it was measured (``objective_epoch == epoch``: a trial reports
    every epoch but is judged at its checkpoints; in between it repeats its last judgement)."""
    if objective not in history.columns:
        return pd.DataFrame(columns=["trial", "epoch", "objective"])
    rows = history.dropna(subset=[objective])
    if "objective_epoch" in rows.columns:
        fresh = rows["objective_epoch"].isna() | (rows["objective_epoch"] == rows["epoch"])
        rows = rows[fresh]
    out = rows[["trial", "epoch", objective]].rename(columns={objective: "objective"})
    return out.drop_duplicates(["trial", "epoch"], keep="last").reset_index(drop=True)


@dataclass
class AuditOutcome:
    """What a sweep's fully trained trials say about its early judgements."""

    correlations: pd.DataFrame         # rung_correlations over the fully trained trials
    full: list                         # trials trained to the full budget (kept by ASHA or audited)
    audited: list                      # ... of which the audit let run on
    pick: object                       # the best fully trained trial ASHA kept (None: none)
    best: object                       # the best fully trained trial, audited or not (None: none)
    regret: float                      # final objective of ``best`` minus that of ``pick``


def audit_outcome(curves: pd.DataFrame, full: list, audited: set, *, seed: int = 0) -> AuditOutcome:
    """Rung correlations and ASHA's regret from the trials in ``full`` (trained to the last epoch);
    ``audited``: those ASHA would have stopped. The regret is the final objective of the best fully
    trained trial minus that of the best one ASHA itself kept (0: the audit found nothing better)."""
    part = curves[curves["trial"].isin(full)]
    if part.empty:
        return AuditOutcome(pd.DataFrame(columns=["epoch", "spearman", "ci_low", "ci_high", "trials"]),
                            [], [], None, None, math.nan)
    last = final_epoch(part)
    final = objective_at(part, last)
    kept = final[[t not in audited for t in final.index]]
    best = final.idxmax()
    pick = kept.idxmax() if not kept.empty else None
    regret = float(final[best] - kept[pick]) if pick is not None else math.nan
    return AuditOutcome(rung_correlations(part, seed=seed), list(final.index),
                        [t for t in final.index if t in audited], pick, best, regret)
