"""Ray Tune function trainable: evaluate one backbone on the sweep's episodes (probe or finetune).

Small enough that many pack onto one GPU with fractional resources.
"""

from __future__ import annotations

from pathlib import Path

from cxrtune.trainables._log import trial_folder, trial_log
from cxrtune.trainables._resources import apply_trial_resources, memory_cap
from ray import tune

from cxrtune.packing import process_peaks
from cxrtune.trial import run_fewshot_trial


def fewshot_trainable(config: dict, inputs: dict | None = None, packing: dict | None = None) -> None:
    """``inputs``: the sweep's data (cache, episodes); ``packing``: the sweep's packing plan
    (:meth:`cxrtune.packing.PackingPlan.trial_info`), for the message of a trial over its memory
    cap; both given with ``tune.with_parameters``."""
    share = apply_trial_resources()
    out_dir = trial_folder()

    def report(metrics: dict, folder: Path | None) -> None:
        tune.report({**metrics, **process_peaks()})  # what packing is sized by, as this trial used it

    evaluators = (config.get("case") or {}).get("eval.evaluators") or config.get("eval.evaluators") or ()
    kind = evaluators[0] if len(evaluators) == 1 else None
    with trial_log(), memory_cap(share, packing, kind):
        run_fewshot_trial(config, inputs or {}, report, out_dir)
