"""Ray Tune function trainable: one SSL pretraining judged by an in-loop few-shot probe.

Reports every epoch (SSL loss, collapse monitors, images/s and the latest probe objective) and
saves a ``tune.Checkpoint`` whenever the engine writes one; resumes from ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ray import tune

from cxrtune.trial import run_pretrain_trial
from trainables._resources import apply_trial_resources


def pretrain_trainable(config: dict) -> None:
    apply_trial_resources()

    def report(metrics: dict, folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    work_dir = Path(tune.get_context().get_trial_dir()) / "work"
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_pretrain_trial(config, work_dir, report)
        return
    with checkpoint.as_directory() as restored:
        run_pretrain_trial(config, work_dir, report, restore_from=restored)
