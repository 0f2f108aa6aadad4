"""Multi-fidelity plans: where ASHA judges a trial.

:func:`asha_rungs` gives the epochs at which ASHA (grace period ``g``, reduction factor ``eta``)
compares trials: ``g, g*eta, g*eta**2, ...`` below the full budget, then the full budget. A sweep
makes its trials checkpoint, and so be judged, at exactly these epochs (``train.checkpoint_epochs``):
a rung then compares objectives measured at the rung, not at the last multiple of
``train.checkpoint_every`` before it, and with the ``wsd`` schedule each rung's judgement is a
cooldown branch (:mod:`cxrtune.engine.cooldown`). No Ray import.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cxrtune.errors import ConfigError


def asha_rungs(grace: int, eta: int, max_epoch: int) -> list[int]:
    """ASHA's rung epochs: ``grace * eta**k`` below ``max_epoch``, then ``max_epoch`` itself."""
    if grace < 1 or eta < 2 or max_epoch < 1:
        raise ConfigError(f"ASHA rungs need a grace period >= 1, a reduction factor >= 2 and a budget >= 1 epoch; "
                          f"got grace {grace}, reduction {eta}, budget {max_epoch}")
    out, rung = [], grace
    while rung < max_epoch:
        out.append(rung)
        rung *= eta
    return out + [max_epoch]


@dataclass(frozen=True)
class BudgetPlan:
    """A successive-halving sweep sized to a budget.

    ``epoch_hours``: hours one trial takes per epoch on its share of the resources, measured;
    ``judge_hours``: hours of one judgement (the probe); ``cooldown_fraction``: a wsd judgement at
    epoch r also trains ``cooldown_fraction * r`` epochs; ``start_hours``: what each trial pays once
    before it trains (building the model, the first steps, its random-init judgement). ``concurrency`` trials run side by side,
    each at the measured rate, so the sweep's wall time is its trial hours over ``concurrency``.
    """

    budget_hours: float
    epoch_hours: float
    judge_hours: float
    cooldown_fraction: float
    concurrency: int
    grace: int
    eta: int
    epochs: int
    trials: int
    rungs: tuple[int, ...]
    survivors: tuple[int, ...]         # trials that reach each rung
    projected_hours: float             # wall hours
    start_hours: float = 0.0

    @property
    def full_trials(self) -> int:
        return self.survivors[-1]

    def describe(self) -> str:
        path = ", ".join(f"{n} to epoch {r}" for n, r in zip(self.survivors, self.rungs))
        return (f"plan: {self.trials} trials, ASHA grace {self.grace} epochs, reduction {self.eta}: {path}; "
                f"{self.full_trials} reach the full budget of {self.epochs} epochs; projected "
                f"{self.projected_hours:.2f} h of {self.budget_hours:g} h ({self.concurrency} side by side; "
                f"{self.epoch_hours * 60:.2f} min per epoch and {self.judge_hours * 3600:.0f} s per judgement, "
                "measured)")

    def to_dict(self) -> dict:
        return {**asdict(self), "full_trials": self.full_trials}


def survivors(trials: int, eta: int, rung_count: int) -> list[int]:
    """How many of ``trials`` reach each rung when each rung keeps the best ``1/eta`` (at least one)."""
    out = [trials]
    for _ in range(rung_count - 1):
        out.append(max(1, out[-1] // eta))
    return out


def sweep_hours(trials: int, rungs: list[int], eta: int, epoch_hours: float, judge_hours: float,
                cooldown_fraction: float, concurrency: int, start_hours: float = 0.0) -> float:
    """Projected wall hours of successive halving over ``trials`` (see :class:`BudgetPlan`)."""
    hours, previous = trials * start_hours, 0
    for n, rung in zip(survivors(trials, eta, len(rungs)), rungs):
        hours += n * ((rung - previous + cooldown_fraction * rung) * epoch_hours + judge_hours)
        previous = rung
    return hours / max(1, min(concurrency, trials))


def plan_budget(budget_hours: float, epoch_hours: float, judge_hours: float, epochs: int, grace: int, eta: int = 3,
                concurrency: int = 1, cooldown_fraction: float = 0.0, max_trials: int = 1000,
                start_hours: float = 0.0) -> BudgetPlan:
    """The largest successive-halving sweep whose projected wall time fits ``budget_hours``.

    Refused (naming what one full trial needs) when not even one trial fits."""
    if budget_hours <= 0 or not math.isfinite(budget_hours):
        raise ConfigError(f"--budget-hours = {budget_hours}: use a positive number of hours")
    if epoch_hours <= 0 or judge_hours < 0:
        raise ConfigError(f"measured rates must be positive: {epoch_hours} h per epoch, {judge_hours} h per judgement")
    grace = min(grace, epochs)
    steps = asha_rungs(grace, eta, epochs)

    def cost(n: int) -> float:
        return sweep_hours(n, steps, eta, epoch_hours, judge_hours, cooldown_fraction, concurrency, start_hours)

    if cost(1) > budget_hours:
        raise ConfigError(
            f"--budget-hours {budget_hours:g}: one trial of {epochs} epochs needs {cost(1):.2f} h here "
            f"({epoch_hours * 60:.2f} min per epoch, measured); raise the budget or lower train.epochs")
    low, high = 1, max_trials
    while low < high:  # cost grows with n: the largest n that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= budget_hours else (low, mid - 1)
    return BudgetPlan(budget_hours, epoch_hours, judge_hours, cooldown_fraction, concurrency, grace, eta, epochs,
                      low, tuple(steps), tuple(survivors(low, eta, len(steps))), cost(low), start_hours)
