"""Budget plans on fake rates, worked by hand, and a budget kept when trials run slower than planned
(the scheduler's and searcher's checks replayed on a fake clock)."""

from __future__ import annotations

import pytest
from ray.tune.schedulers import TrialScheduler

from cxrtune.errors import ConfigError
from cxrtune.plan import asha_rungs, plan_budget, survivors, sweep_hours
from cxrtune.sweep import budget
from cxrtune.sweep.budget import BudgetClock, CostModel
from cxrtune.sweep.scheduler import SweepASHA


def test_rungs_and_survivors():
    assert asha_rungs(1, 3, 9) == [1, 3, 9] and asha_rungs(20, 2, 20) == [20] and asha_rungs(1, 2, 3) == [1, 2, 3]
    assert survivors(9, 3, 3) == [9, 3, 1] and survivors(10, 3, 3) == [10, 3, 1] and survivors(2, 3, 3) == [2, 1, 1]
    with pytest.raises(ConfigError, match="reduction factor >= 2"):
        asha_rungs(1, 1, 9)


def test_plan_fits_the_most_trials_the_budget_carries():
    # 0.1 h per epoch, free judgements; 9 trials: 9x1 + 3x2 + 1x6 = 21 epochs = 2.1 h; 10 trials: 22 epochs
    plan = plan_budget(2.15, epoch_hours=0.1, judge_hours=0.0, epochs=9, grace=1, eta=3)
    assert (plan.trials, plan.rungs, plan.survivors, plan.full_trials) == (9, (1, 3, 9), (9, 3, 1), 1)
    assert plan.projected_hours == pytest.approx(2.1)
    assert plan_budget(2.2, 0.1, 0.0, 9, 1, 3).trials == 10
    # two side by side: half the wall time, so twice the budget's worth of trial hours
    two = plan_budget(2.15, 0.1, 0.0, 9, 1, 3, concurrency=2)
    assert two.trials > 9 and two.projected_hours <= 2.15
    assert sweep_hours(two.trials + 1, [1, 3, 9], 3, 0.1, 0.0, 0.0, 2) > 2.15
    assert "9 trials" in plan.describe() and "1 reach the full budget of 9 epochs" in plan.describe()


def test_judgements_and_cooldowns_are_priced():
    # 3 trials: rung 1: 3 x ((1 + 0.2) x 0.1 + 0.01); rung 3: 1 x ((2 + 0.6) x 0.1 + 0.01); rung 9: 1 x ((6 + 1.8) x 0.1 + 0.01)
    assert sweep_hours(3, [1, 3, 9], 3, 0.1, 0.01, 0.2, 1) == pytest.approx(0.39 + 0.27 + 0.79)


def test_a_budget_that_cannot_carry_one_trial_is_refused_naming_the_need():
    with pytest.raises(ConfigError, match=r"one trial of 9 epochs needs 0\.90 h"):
        plan_budget(0.5, 0.1, 0.0, 9, 1, 3)
    with pytest.raises(ConfigError, match="positive number of hours"):
        plan_budget(0, 0.1, 0.0, 9, 1, 3)


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_the_budget_holds_when_trials_run_twice_as_slow_as_planned(tmp_path):
    """Planned 10 s per epoch, real 20 s: starts and promotions are priced at the observed rate, so
    the sweep ends within its budget; a plain ASHA would have spent far more."""
    now = [0.0]
    clock = BudgetClock(tmp_path, budget_s=400.0, now=lambda: now[0])
    cost = CostModel(epoch_s=10.0, judge_s=0.0)
    asha = SweepASHA(time_attr="training_iteration", metric="objective", mode="max", max_t=9, grace_period=1,
                     reduction_factor=3, folder=tmp_path, budget_s=400.0, cost=cost)
    budget._CLOCKS[str(tmp_path.resolve())] = clock  # the sweep's clock in this process: the fake one
    assert asha.clock is clock
    try:
        started, epochs_run = 0, 0
        for k in range(20):  # trials one after the other, later ones better at every epoch
            if not clock.allows(clock.start_seconds(cost, 1), "trial start", f"t{k}"):
                break
            trial = _Trial(f"t{k}")
            asha.on_trial_add(None, trial)
            started += 1
            for epoch in range(1, 10):
                now[0] += 20.0
                epochs_run += 1
                result = {"training_iteration": epoch, "objective": k + epoch / 10, "time_total_s": 20.0 * epoch}
                if epoch == 9 or asha.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                    asha.on_trial_complete(None, trial, result)
                    break
        assert clock.spent() <= 400.0
        assert epochs_run == clock.spent() / 20
        assert started >= 3 and clock.refusals  # the budget ended the sweep, not the trial count
        kinds = {r["what"].split(" at ")[0] for r in clock.refusals}
        assert kinds <= {"trial start", "promotion"}
    finally:
        budget.forget_clocks()
