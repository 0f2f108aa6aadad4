"""What the Optuna study learns of each trial: a trial stopped early is PRUNED with its
intermediate values, a trial that trained to the end is COMPLETE."""

from __future__ import annotations

import optuna
from ray import tune

from cxrtune.sweep.optuna_state import ResumableOptunaSearch


def test_a_trial_stopped_early_reaches_the_study_as_pruned(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = ResumableOptunaSearch(space={"x": tune.uniform(0.0, 1.0)}, metric="objective", mode="max", seed=0,
                                     study_name="s", storage=optuna.storages.RDBStorage(storage))
    for trial_id in ("early", "full", "errored", "unmarked"):
        assert searcher.suggest(trial_id) is not None
    for step, value in ((1, 0.40), (2, 0.45)):
        for trial_id in ("early", "full"):
            searcher.on_trial_result(trial_id, {"objective": value, "training_iteration": step})
    searcher.on_trial_complete("early", {"objective": 0.45, "training_iteration": 2, "final": False})
    searcher.on_trial_result("full", {"objective": 0.52, "training_iteration": 3})
    searcher.on_trial_complete("full", {"objective": 0.52, "training_iteration": 3, "final": True})
    searcher.on_trial_complete("errored", {"objective": 0.1, "final": False}, error=True)
    searcher.on_trial_complete("unmarked", {"objective": 0.3})  # a trainable that reports no "final"
    study = optuna.load_study(study_name="s", storage=storage)
    by_number = {t.number: t for t in study.get_trials()}
    early, full, errored, unmarked = (by_number[i] for i in range(4))
    assert early.state == optuna.trial.TrialState.PRUNED
    assert early.intermediate_values == {1: 0.40, 2: 0.45} and early.value == 0.45  # Optuna takes the last
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == 0.52
    assert errored.state == optuna.trial.TrialState.COMPLETE  # as Ray's searcher: an error with a value
    assert unmarked.state == optuna.trial.TrialState.COMPLETE and unmarked.value == 0.3
    # a second completion of a trial already told is ignored, as by Ray's searcher
    searcher.on_trial_complete("early", {"objective": 0.9, "final": True})
    assert optuna.load_study(study_name="s", storage=storage).get_trials()[0].state == optuna.trial.TrialState.PRUNED
