"""Small sweep folders and results tables for the analysis tests, written the way Tune, the sweep
driver and compare_methods write them (field names as in a real smoke sweep's output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

DISEASES = ("atelectasis", "effusion", "mass", "nodule")
SHOTS = (1, 5, 20)


def results_table(seed: int = 0, trials: int = 3) -> pd.DataFrame:
    """Tidy results: moco/barlow/random-resnet18 x probe/finetune x 4 diseases x 3 shots x trials."""
    rng = np.random.default_rng(seed)
    rows = []
    for backbone, init, shift in (("moco_variance", "/runs/moco/export/backbone.pt", 0.08),
                                  ("barlow_lambda", "/runs/barlow/export/backbone.pt", 0.03),
                                  ("random-resnet18", "random", 0.0)):
        for evaluator in ("probe", "finetune"):
            for d, disease in enumerate(DISEASES):
                for shots in SHOTS:
                    for trial in range(trials):
                        auroc = float(np.clip(0.55 + shift + 0.02 * d + 0.04 * np.log(shots) + rng.normal(0, 0.03), 0, 1))
                        rows.append({"backbone": backbone, "evaluator": evaluator, "disease": disease, "shots": shots,
                                     "n": 2 * shots, "trial": trial, "auroc": auroc, "accuracy": auroc - 0.05,
                                     "f1": auroc - 0.1, "C": 1.0, "k": np.nan, "init": init, "arch": "resnet18"})
    return pd.DataFrame(rows)


def episodes_table(diseases=DISEASES, shots=(5, 20), trials: int = 2, salt: str = "") -> pd.DataFrame:
    rows = []
    for disease in diseases:
        for s in shots:
            for t in range(trials):
                train = [f"{disease}-tr{i}{salt}" for i in range(2 * s)]
                test = [f"{disease}-te{i}" for i in range(4)]
                rows.append({"disease": disease, "shots": s, "n": 2 * s, "trial": t, "seed": 42 + t,
                             "train_ids": train, "train_labels": [1] * s + [0] * s,
                             "test_ids": test, "test_labels": [1, 1, 0, 0]})
    return pd.DataFrame(rows)


def _probe_table(rng, level: float, shots=(5, 20), trials: int = 2) -> pd.DataFrame:
    rows = [{"disease": d, "shots": s, "n": 2 * s, "trial": t, "C": 1.0,
             "auroc": float(np.clip(level + rng.normal(0, 0.05), 0, 1)), "accuracy": 0.5, "f1": 0.5}
            for d in DISEASES for s in shots for t in range(trials)]
    return pd.DataFrame(rows)


def sweep_folder(storage: Path, name: str = "moco_variance", n_trials: int = 3, running: bool = False,
                 statuses: tuple[str, ...] | None = None, optuna_trials: int | None = None, seed: int = 0) -> Path:
    """A pretraining sweep folder: trial folders with params.json / result.json / probe tables,
    episodes.parquet, trials.csv (unless ``running``) and an Optuna study of ``optuna_trials``."""
    rng = np.random.default_rng(seed)
    folder = Path(storage) / name
    folder.mkdir(parents=True)
    episodes_table().to_parquet(folder / "episodes.parquet", index=False)
    statuses = statuses or ("completed",) * n_trials
    rows = []
    for k, status in enumerate(statuses):
        trial_id = f"{k:04x}abcd"
        trial_dir = folder / f"pretrain_trainable_{trial_id}"
        (trial_dir / "work").mkdir(parents=True)
        params = {"method": "moco", "model.arch": "resnet18", "train.seed": 0, "moco.temperature": 0.05 + 0.05 * k,
                  "optim.lr": 0.01 * (k + 1), "trial.cache": str(folder / "no-cache"),
                  "trial.episodes": str(folder / "episodes.parquet"), "probe.input_size": 32}
        (trial_dir / "params.json").write_text(json.dumps(params))
        epochs = 1 if (running and k == len(statuses) - 1) else 3
        lines, total = [], 0.0
        for epoch in range(1, epochs + 1):
            total += 10.0 + k
            collapsed = status == "collapsed"
            report = {"epoch": epoch, "ssl_loss": 5.0 - 0.3 * epoch, "feature_std": 0.5 / epoch if collapsed else 0.5,
                      "feature_std_batch": 1.0, "effective_rank": 12.0 / epoch if collapsed else 12.0,
                      "mean_cosine": 0.5, "images_per_s": 30.0 + k + epoch, "seconds": 9.0,
                      "probe_auroc_5shot": 0.5 + 0.01 * epoch, "probe_auroc_20shot": 0.55 + 0.02 * k + 0.01 * epoch,
                      "initial_probe_auroc_5shot": 0.5, "initial_probe_auroc_20shot": 0.55,
                      "final": epoch == 3 and status in ("completed",), "trial_status": status if epoch == epochs and
                      status in ("collapsed", "diverged") else "ok",
                      "checkpoint_dir_name": f"checkpoint_{epoch - 1:06d}", "training_iteration": epoch,
                      "trial_id": trial_id, "time_total_s": total, "timestamp": 1_800_000_000 + 100 * k + total}
            lines.append(json.dumps(report))
            ckpt = trial_dir / f"checkpoint_{epoch - 1:06d}"
            ckpt.mkdir()
            _probe_table(rng, report["probe_auroc_20shot"]).to_parquet(ckpt / "probe_results.parquet", index=False)
            # a trial's checkpoint always holds its backbone; choosing the best checkpoint looks for the
            # file (cxrtune.export.best_report) and nothing in these tests loads it
            (ckpt / "backbone.pt").write_bytes(b"")
        (trial_dir / "result.json").write_text("\n".join(lines) + "\n")
        _probe_table(rng, 0.55).to_parquet(trial_dir / "work" / "initial_probe_results.parquet", index=False)
        last = json.loads(lines[-1])
        rows.append({"trial": trial_id, "status": status, "epochs": last["epoch"],
                     "probe_auroc_20shot": last["probe_auroc_20shot"], "random_init": 0.55,
                     "moco.temperature": params["moco.temperature"], "optim.lr": params["optim.lr"]})
    if not running:
        pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
    if optuna_trials:
        write_optuna_study(folder / "optuna.db", name, optuna_trials, seed)
    return folder


def write_optuna_study(path: Path, name: str, n: int, seed: int = 0) -> None:
    """A study whose objective depends on lr only: importance must rank optim.lr first."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed))

    def objective(trial):
        lr = trial.suggest_float("optim.lr", 0.005, 0.2, log=True)
        trial.suggest_float("moco.temperature", 0.03, 0.3, log=True)
        return 0.5 + 0.1 * np.log10(lr / 0.005)

    study.optimize(objective, n_trials=n)


class FakeCache:
    """What GroundTruth needs of an ImageCache: path, size, fit, index (with cache_row)."""

    def __init__(self, path: Path, index: pd.DataFrame, size: int, fit: str = "crop") -> None:
        self.path = Path(path)
        self.size = size
        self.fit = fit
        self.index = index.assign(cache_row=np.arange(len(index)))
        self.report = {}
