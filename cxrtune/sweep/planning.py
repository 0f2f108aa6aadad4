"""``--budget-hours``: measure a trial's rate here, plan the sweep to the budget, report against it.

Before the first trial the driver trains a few steps of the sweep's first point (its seed point) on
the trial's device with the trial's CPU threads (:func:`cxrtune.engine.rate.step_seconds`) and
times one judgement (the random-init probe every trial starts with; its features stay in the
feature cache, so the trials do not extract them again). :func:`cxrtune.plan.plan_budget` sizes the
successive-halving sweep to the budget; the plan is printed, written to ``<sweep>/plan.json`` and
logged as the parent run's ``plan.*`` params. The scheduler and the searcher keep to the budget
while the sweep runs (:mod:`cxrtune.sweep.budget`); :func:`budget_line` says what was used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cxrtune.errors import CxrtuneError
from cxrtune.plan import BudgetPlan, plan_budget
from cxrtune.sweep.budget import CostModel, read_budget
from cxrtune.sweepfolder import PLAN_FILE


def measure_cost(resolved, point: dict[str, Any], data, threads: int) -> CostModel:
    """Seconds per epoch and per judgement of a trial at ``point``, measured here."""
    import torch

    from cxrtune.data.tasks import load_episodes
    from cxrtune.engine.rate import step_seconds
    from cxrtune.models.backbone import build_backbone
    from cxrtune.trial import ProbeJudge, _device, pretrain_rows

    config = resolved.pretrain.override(point)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        rows = pretrain_rows(data.cache, resolved.trial.pretrain_subset)
        per_step, setup_s = step_seconds(config, data.cache.images, rows)
        epoch_s = per_step * (len(rows) // config.train.batch_size)
        judge = ProbeJudge(data.eval_cache, load_episodes(data.episodes_path), resolved.probe, _device(config))
        model = config.model
        backbone = build_backbone(model.arch, model.init, model.weights, model.in_chans)
        started = time.perf_counter()
        judge(backbone)  # features extracted and probed, as at every rung (the cache is not asked)
        judge_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(before)
    cooldown = config.optim.cooldown_fraction if config.optim.schedule == "wsd" else 0.0
    return CostModel(epoch_s=epoch_s, judge_s=judge_s, cooldown_fraction=cooldown, start_s=setup_s + judge_s)


def make_plan(budget_hours: float, cost: CostModel, epochs: int, grace: int, eta: int, concurrency: int,
              num_samples: int | None) -> BudgetPlan:
    """The plan for the budget; ``num_samples`` (given by the user) must fit it."""
    plan = plan_budget(budget_hours, cost.epoch_s / 3600, cost.judge_s / 3600, epochs, grace, eta, concurrency,
                       cost.cooldown_fraction, start_hours=cost.start_s / 3600)
    if num_samples is not None and num_samples > plan.trials:
        raise CxrtuneError(f"--num-samples {num_samples} does not fit --budget-hours {budget_hours:g}: at the measured "
                           f"rate the budget carries at most {plan.trials} trials; leave --num-samples out (the plan "
                           "chooses) or raise the budget")
    if num_samples is not None:
        plan = plan_budget(budget_hours, cost.epoch_s / 3600, cost.judge_s / 3600, epochs, grace, eta, concurrency,
                           cost.cooldown_fraction, max_trials=num_samples, start_hours=cost.start_s / 3600)
    return plan


def write_plan(folder: Path, plan: BudgetPlan, cost: CostModel) -> None:
    record = {"plan": plan.to_dict(), "cost": cost.to_dict()}
    tmp = folder / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / PLAN_FILE)


def read_plan(folder: Path) -> tuple[BudgetPlan, CostModel] | None:
    path = folder / PLAN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    fields = {k: v for k, v in record["plan"].items() if k != "full_trials"}
    fields.update(rungs=tuple(fields["rungs"]), survivors=tuple(fields["survivors"]))
    return BudgetPlan(**fields), CostModel(**record["cost"])


def plan_params(plan: BudgetPlan) -> dict[str, Any]:
    """The plan as the sweep's parent-run params."""
    return {"plan.budget_hours": plan.budget_hours, "plan.trials": plan.trials,
            "plan.rungs": ",".join(map(str, plan.rungs)), "plan.survivors": ",".join(map(str, plan.survivors)),
            "plan.full_trials": plan.full_trials, "plan.projected_hours": round(plan.projected_hours, 4),
            "plan.epoch_minutes": round(plan.epoch_hours * 60, 4), "plan.judge_seconds": round(plan.judge_hours * 3600, 2)}


def budget_line(folder: Path) -> str | None:
    """Budget used against the plan, for the summary; None for a sweep without a budget."""
    planned = read_plan(folder)
    if planned is None:
        return None
    plan, _ = planned
    used = read_budget(folder)
    spent_h = float(used.get("spent_s", 0.0)) / 3600
    refused = used.get("refusals", [])
    kinds: dict[str, int] = {}
    for r in refused:
        kind = r["what"].split(" at ")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    refusals = "; ".join(f"{n} {k} refused" for k, n in kinds.items()) or "nothing refused"
    return (f"budget: {spent_h:.2f} h used of {plan.budget_hours:g} h (plan: {plan.trials} trials, projected "
            f"{plan.projected_hours:.2f} h); {refusals} for lack of budget")
