"""One definition of "the best checkpoint": the summary, the export and the analysis pick the same
trial and epoch, also when the trial with the highest-ever report lost that checkpoint to
``num_to_keep`` (Tune's own "best result" then names a trial whose best report is gone)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
from ray.tune import Result

from cxrtune.analysis.localise import best_checkpoint_dir
from cxrtune.models.backbone import build_backbone, save_backbone
from cxrtune.sweep.summary import summarise
from cxrtune.sweepfolder import INITIAL_RESULTS, STATE_FILE

OBJECTIVE = "probe_auroc_20shot"
DISEASES = ("effusion", "fibrosis", "mass")


def _probe_table(level: float) -> pd.DataFrame:
    rows = [{"disease": d, "shots": shots, "trial": t, "auroc": level + 0.01 * i - 0.005 * t}
            for i, d in enumerate(DISEASES) for shots in (5, 20) for t in range(2)]
    return pd.DataFrame(rows)


def _trial(folder, trial_id, values, kept, seed):
    """A trial folder as Tune and the trainable leave it: every report in result.json, only the
    checkpoints in ``kept`` still on disk."""
    trial_dir = folder / f"pretrain_trainable_{trial_id}"
    (trial_dir / "work").mkdir(parents=True)
    (trial_dir / "params.json").write_text(json.dumps({"moco.temperature": 0.1 * seed}))
    _probe_table(0.50).to_parquet(trial_dir / "work" / INITIAL_RESULTS)
    lines = []
    for epoch, value in enumerate(values, start=1):
        name = f"checkpoint_{epoch - 1:06d}"
        checkpoint = trial_dir / name
        save_backbone(build_backbone("resnet18", seed=seed * 10 + epoch), checkpoint / "backbone.pt")
        _probe_table(value - 0.01).to_parquet(checkpoint / "probe_results.parquet")
        (checkpoint / STATE_FILE).write_text(json.dumps({"objective_epoch": epoch}))
        lines.append({OBJECTIVE: value, "epoch": epoch, "training_iteration": epoch, "checkpoint_dir_name": name,
                      "trial_id": trial_id, "final": epoch == len(values)})
    for epoch in range(1, len(values) + 1):
        if epoch not in kept:
            shutil.rmtree(trial_dir / f"checkpoint_{epoch - 1:06d}")
    (trial_dir / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return Result(metrics=lines[-1], checkpoint=None, error=None, path=str(trial_dir))


def test_summary_export_and_analysis_name_the_same_trial_and_epoch(tmp_path):
    folder = tmp_path / "runs" / "moco_variance"
    # trial aaa reported the highest value ever (0.64 at epoch 1), but that checkpoint was deleted;
    # the best report still on disk is bbb's epoch 2 (0.60)
    results = [_trial(folder, "aaa", [0.64, 0.52, 0.53], kept={2, 3}, seed=1),
               _trial(folder, "bbb", [0.55, 0.60, 0.58], kept={2, 3}, seed=2)]
    summary = summarise(results, OBJECTIVE, ["moco.temperature"], folder)

    assert "best trial bbb at epoch 2:" in summary["text"], summary["text"]
    exported = json.loads((folder / "export" / "metrics.json").read_text())
    assert exported["trial_id"] == "bbb"
    assert exported["checkpoint"].endswith("pretrain_trainable_bbb/checkpoint_000001")
    assert best_checkpoint_dir(folder, OBJECTIVE) == folder / "pretrain_trainable_bbb" / "checkpoint_000001"
    shutil.rmtree(folder / "export")  # the analysis without an export decides the same way
    assert best_checkpoint_dir(folder, OBJECTIVE) == folder / "pretrain_trainable_bbb" / "checkpoint_000001"
    # the comparison with random init is made on that checkpoint's probes (0.59 level vs 0.50)
    assert abs(summary["comparison"]["best"] - (0.59 + 0.01 - 0.0025)) < 1e-9
    table = pd.read_csv(folder / "trials.csv")
    assert list(table["trial"]) == ["aaa", "bbb"]
