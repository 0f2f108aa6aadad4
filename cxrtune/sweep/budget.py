"""A sweep's budget while it runs: the clock, and the cost of the next piece of work.

``--budget-hours`` makes the driver measure a trial's rate and plan the sweep to the budget
(:func:`cxrtune.plan.plan_budget`, written to ``<sweep>/plan.json``). While the sweep runs, this
module keeps it to the budget:

- :class:`BudgetClock`: wall seconds the sweep has spent, across driver sessions (a resumed sweep
  goes on from what it had spent), kept in ``<sweep>/budget.json`` with every refusal;
- :class:`CostModel`: the seconds a trial needs to reach an epoch from where it is, at the planned
  rate or at the trial's own observed rate when that is slower (a trial running slower than
  measured is not promoted on the plan's optimism).

The searcher asks the clock before it starts a trial (it must reach its first rung), the scheduler
before it promotes one (it must reach the next rung) or lets the audit run one on (to the end).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from cxrtune.sweepfolder import BUDGET_FILE

_CLOCKS: dict[str, "BudgetClock"] = {}


@dataclass(frozen=True)
class CostModel:
    """Planned seconds per epoch and per judgement of one trial, the wsd cooldown share, and the
    seconds a trial pays once before it trains (building the model, the first steps; a Ray worker's
    own start is not in it: the observed rates take it in once trials report)."""

    epoch_s: float
    judge_s: float
    cooldown_fraction: float = 0.0
    start_s: float = 0.0

    def seconds(self, from_epoch: int, to_epoch: int, observed_epoch_s: float = 0.0) -> float:
        """Seconds to train from ``from_epoch`` to ``to_epoch`` and be judged there."""
        per_epoch = max(self.epoch_s, observed_epoch_s)
        return (to_epoch - from_epoch + self.cooldown_fraction * to_epoch) * per_epoch + self.judge_s

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class BudgetClock:
    """Wall seconds spent by a sweep against ``budget_s``; one per sweep folder in a process."""

    def __init__(self, folder: str | Path, budget_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(folder) / BUDGET_FILE
        record = self._read()
        self.budget_s = float(budget_s)
        self.prior_s = float(record.get("spent_s", 0.0))
        self.refusals: list[dict[str, Any]] = list(record.get("refusals", []))
        self.observed_epoch_s = float(record.get("observed_epoch_s", 0.0))
        self.now = now
        self.started = now()

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            return {}

    @classmethod
    def of(cls, folder: str | Path, budget_s: float) -> "BudgetClock":
        """The clock of the sweep in ``folder`` for this process (started on first use)."""
        key = str(Path(folder).resolve())
        if key not in _CLOCKS:
            _CLOCKS[key] = cls(folder, budget_s)
        return _CLOCKS[key]

    def observe(self, epoch_s: float) -> None:
        """A trial's observed seconds per epoch: the slowest seen prices the next trial's start."""
        self.observed_epoch_s = max(self.observed_epoch_s, epoch_s)

    def start_seconds(self, cost: CostModel, grace: int) -> float:
        """Seconds a new trial needs to its first rung: its initial judgement, ``grace`` epochs and
        the judgement there, at the slowest rate seen so far."""
        return cost.start_s + cost.judge_s + cost.seconds(0, grace, self.observed_epoch_s)

    def spent(self) -> float:
        return self.prior_s + self.now() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.spent()

    def allows(self, needed_s: float, what: str, trial_id: str | None = None) -> bool:
        """Whether ``needed_s`` fits the remaining budget; a refusal is recorded with its numbers."""
        remaining = self.remaining()
        if needed_s <= remaining:
            return True
        self.refusals.append({"what": what, "trial": trial_id, "needed_s": round(needed_s, 1),
                              "remaining_s": round(remaining, 1), "spent_s": round(self.spent(), 1)})
        self.save()
        return False

    def save(self) -> None:
        record = {"budget_s": self.budget_s, "spent_s": self.spent(), "observed_epoch_s": self.observed_epoch_s,
                  "refusals": self.refusals}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.path)


def forget_clocks() -> None:
    """Drop the process's clocks (a driver that runs several sweeps, or a test)."""
    _CLOCKS.clear()


def read_budget(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / BUDGET_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
