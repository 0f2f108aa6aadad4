"""Ray Tune function trainable: evaluate one backbone on the sweep's episodes (probe or finetune).

Small enough that many pack onto one GPU with fractional resources.
"""

from __future__ import annotations

from pathlib import Path

from ray import tune

from cxrtune.trial import run_fewshot_trial
from cxrtune.trainables._log import trial_folder, trial_log
from cxrtune.trainables._resources import apply_trial_resources


def fewshot_trainable(config: dict, inputs: dict | None = None) -> None:
    """``inputs``: the sweep's data (cache, episodes), given with ``tune.with_parameters``."""
    apply_trial_resources()
    out_dir = trial_folder()

    def report(metrics: dict, folder: Path | None) -> None:
        tune.report(metrics)

    with trial_log():
        run_fewshot_trial(config, inputs or {}, report, out_dir)
