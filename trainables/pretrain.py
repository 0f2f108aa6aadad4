"""Ray Tune function trainable: one SSL pretraining judged by an in-loop few-shot probe.

Reports every epoch (SSL loss, collapse monitors, images/s and the latest probe objective) and
saves a ``tune.Checkpoint`` whenever the engine writes one; resumes from ``tune.get_checkpoint()``.
What the trial prints goes to ``<trial>/trial.log``.
"""

from __future__ import annotations

from pathlib import Path

from ray import tune

from cxrtune.sweepfolder import WORK_DIR
from cxrtune.trial import run_pretrain_trial
from cxrtune.trainables._log import trial_folder, trial_log
from cxrtune.trainables._resources import apply_trial_resources


def pretrain_trainable(config: dict, inputs: dict | None = None) -> None:
    """``inputs``: the sweep's data (caches, episodes), given with ``tune.with_parameters``."""
    apply_trial_resources()
    with trial_log():
        _pretrain(config, inputs or {})


def _pretrain(config: dict, inputs: dict) -> None:
    def report(metrics: dict, folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    work_dir = trial_folder() / WORK_DIR
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        print(f"trial {tune.get_context().get_trial_id()}: starting in {work_dir}", flush=True)
        run_pretrain_trial(config, inputs, work_dir, report)
        return
    print(f"trial {tune.get_context().get_trial_id()}: continuing from {checkpoint.path}", flush=True)
    with checkpoint.as_directory() as restored:
        run_pretrain_trial(config, inputs, work_dir, report, restore_from=restored)
