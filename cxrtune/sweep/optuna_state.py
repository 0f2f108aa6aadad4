"""Optuna state that survives a crashed and resumed sweep.

Three traps of ``OptunaSearch`` with a persistent study (pitfalls.md):

- ``points_to_evaluate`` are enqueued every time the searcher sets its study up, so a restored
  sweep would evaluate the seed point (the study's setting) again on every resume;
- trials that were running when the driver died stay ``RUNNING`` in the Optuna database forever;
- a trial that ASHA stopped early reaches the study as ``COMPLETE`` with its early objective, so
  TPE compares a one-epoch value with values of trials that trained to the end.

:class:`ResumableOptunaSearch` enqueues a seed point only if no trial of the study already holds
those parameters, and :func:`fail_stale_running_trials` marks orphaned ``RUNNING`` trials as
``FAIL``: on restore for trials the restored searcher never heard of, and at the end of a sweep
for anything still running. A trial whose last report is not its ``final`` one (stopped by the
scheduler) is told to the study as ``PRUNED``: Optuna keeps its intermediate values, takes the last
one as its value, and TPE ranks pruned trials below complete ones, the later-pruned first.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import optuna
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


def _same_params(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) or isinstance(y, float):
            try:
                if not math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12):
                    return False
            except (TypeError, ValueError):
                return False
        elif x != y:
            return False
    return True


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` whose seed points are evaluated once per study, not once per start.

    ``budget = (sweep folder, budget seconds, a trial's cost as a dict, grace period)``: no trial is
    started that the remaining budget cannot carry to its first rung (:mod:`cxrtune.sweep.budget`);
    the search then ends."""

    budget: tuple[str, float, dict, int] | None = None

    def suggest(self, trial_id: str):
        budget = getattr(self, "budget", None)
        if budget is not None:
            from ray.tune.search import Searcher

            from cxrtune.sweep.budget import BudgetClock, CostModel

            folder, budget_s, cost, grace = budget
            clock = BudgetClock.of(folder, budget_s)
            if not clock.allows(clock.start_seconds(CostModel(**cost), grace), "trial start", trial_id):
                return Searcher.FINISHED
        return super().suggest(trial_id)

    def _setup_study(self, mode):  # noqa: D401 - same contract as the parent
        points = self._points_to_evaluate
        if not points or self._evaluated_rewards:
            return super()._setup_study(mode)
        self._points_to_evaluate = []
        try:
            super()._setup_study(mode)
        finally:
            self._points_to_evaluate = points
        # A point counts as evaluated (or on its way) unless its only trials failed: a trial cut
        # off by a crash is marked FAIL on resume and its point is enqueued again.
        alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                 optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        existing = []
        for trial in self._ot_study.get_trials(deepcopy=False, states=alive):
            existing.append(trial.params)
            existing.append(trial.system_attrs.get("fixed_params", {}))
        for point in points:
            if not any(_same_params(point, params) for params in existing):
                self._ot_study.enqueue_trial(point)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """A trial stopped before its end (its last report says ``final: False``) is PRUNED, not COMPLETE."""
        stopped_early = bool(result) and not error and result.get("final") is False
        if not stopped_early or trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # noqa: BLE001 - as the parent: a searcher must not stop the sweep
            log.warning("could not tell Optuna that trial %s was pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str):
        """Restore the searcher, then fail the study's orphans: trials RUNNING in the database
        that the restored searcher does not know (asked after its last save, then the crash)."""
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        storage = self._ot_study._storage
        for trial in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial._trial_id not in known:
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def fail_stale_running_trials(storage_url: str, study_name: str) -> int:
    """Mark every ``RUNNING`` trial of a study as ``FAIL``; return how many were marked.

    Call it before restoring a sweep whose driver died: nothing is running at that moment, so a
    ``RUNNING`` trial in the database can only be an orphan.
    """
    storage = optuna.storages.RDBStorage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    marked = 0
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if trial.state == optuna.trial.TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            marked += 1
    return marked
