"""The pretraining sweeps' scheduler: ASHA, kept to a budget, with a pruning audit.

**Budget.** With a budget (``--budget-hours``: :mod:`cxrtune.sweep.budget`), a trial that ASHA
promotes at a rung goes on only if the remaining budget covers its way to the next rung at the
larger of the planned and its own observed rate; otherwise it stops there (and the refusal is
recorded in ``<sweep>/budget.json``). The searcher makes the same check before it starts a trial.

**Audit.** A trial that ASHA would stop before ``max_t`` is *audited* with probability
``audit_fraction`` (a draw seeded by the sweep's seed and the trial's id, so the same sweep audits
the same trials) and when the budget covers its way to the end. An audited trial continues to its
last epoch, and ASHA never hears of it again: its later results enter no rung, so the decisions on
every other trial are those ASHA takes without the audit. The audited trials are listed in
``<sweep>/audit.json`` (:mod:`cxrtune.sweepfolder`), which the MLflow callback tags them from
(``cxrtune.audit``), the best-checkpoint selection leaves out unless asked, and the report's
fidelity section reads: from the fully trained trials it measures how well each rung's objective
predicts the final one on the user's own sweep (:mod:`cxrtune.analysis.fidelity`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from cxrtune.errors import ConfigError
from cxrtune.sweep.budget import BudgetClock, CostModel
from cxrtune.sweepfolder import AUDIT_FILE, read_audit, write_audit


def audit_draw(seed: int, trial_id: str) -> float:
    """A number in [0, 1) fixed by the sweep's seed and the trial's id."""
    digest = hashlib.sha256(f"{seed}:{trial_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def observed_epoch_seconds(result: dict, time_attr: str) -> float:
    """A trial's own seconds per epoch so far (judgements included), from its last result."""
    epochs = result.get(time_attr) or 0
    return float(result.get("time_total_s", 0.0)) / epochs if epochs else 0.0


class SweepASHA(ASHAScheduler):
    """:class:`ray.tune.schedulers.ASHAScheduler` with a budget and a pruning audit; see the module
    docstring. ``folder``: the sweep folder (the audit list and the budget clock live there)."""

    def __init__(self, *, folder: str | Path | None = None, audit_fraction: float = 0.0, audit_seed: int = 0,
                 budget_s: float | None = None, cost: CostModel | None = None, **asha) -> None:
        if not 0.0 <= audit_fraction <= 1.0:
            raise ConfigError(f"--audit-fraction = {audit_fraction}: use a share between 0 and 1")
        if (audit_fraction or budget_s) and folder is None:
            raise ConfigError("an audited or budgeted sweep needs its folder (the audit list and budget live there)")
        if budget_s is not None and cost is None:
            raise ConfigError("a budgeted sweep needs the cost of a trial's epochs and judgements (cost)")
        super().__init__(**asha)
        self.folder = str(folder) if folder is not None else None
        self.audit_fraction = float(audit_fraction)
        self.audit_seed = int(audit_seed)
        self.budget_s = budget_s
        self.cost = cost
        self._audited: set[str] | None = None

    # -- state -------------------------------------------------------------------------------------
    @property
    def audited(self) -> set[str]:
        if self._audited is None:  # after a restore: the file is the record
            self._audited = read_audit(Path(self.folder) / AUDIT_FILE) if self.folder else set()
        return self._audited

    @property
    def clock(self) -> BudgetClock | None:
        return BudgetClock.of(self.folder, self.budget_s) if self.budget_s is not None else None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_audited"] = None
        return state

    def milestones(self) -> list[int]:
        """ASHA's rung epochs below ``max_t``, ascending."""
        return sorted(int(m) for bracket in self._brackets for m, _ in bracket._rungs if m < self._max_t)

    def _fits(self, trial_id: str, result: dict, to_epoch: int, what: str) -> bool:
        clock = self.clock
        if clock is None:
            return True
        epoch = int(result[self._time_attr])
        needed = self.cost.seconds(epoch, to_epoch, observed_epoch_seconds(result, self._time_attr))
        return clock.allows(needed, f"{what} at epoch {epoch} to epoch {to_epoch}", trial_id)

    # -- decisions ---------------------------------------------------------------------------------
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self.audited:
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if self._time_attr not in result or self._metric not in result:
            return action
        epoch = int(result[self._time_attr])
        if self.clock is not None:
            self.clock.observe(observed_epoch_seconds(result, self._time_attr))
            self.clock.save()
        if epoch >= self._max_t:
            return action
        if action == TrialScheduler.STOP:
            if self.audit_fraction and audit_draw(self.audit_seed, trial.trial_id) < self.audit_fraction \
                    and self._fits(trial.trial_id, result, self._max_t, "audit run-on"):
                self.audited.add(trial.trial_id)
                write_audit(Path(self.folder) / AUDIT_FILE, self.audited, self.audit_fraction, self.audit_seed)
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            return action
        if epoch in self.milestones():  # promoted at this rung: can it reach the next?
            following = [m for m in self.milestones() if m > epoch] + [self._max_t]
            if not self._fits(trial.trial_id, result, following[0], "promotion"):
                self._num_stopped += 1
                return TrialScheduler.STOP
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if self.clock is not None:
            self.clock.save()
        if trial.trial_id in self.audited:
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)
