"""The main job end to end at smoke size: `python sweeps/moco_variance.py --profile smoke`.

One Ray session for the module; everything (cache, sweeps, MLflow store) under tmp_path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
import torchvision

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]


def _load_sweep_script(name: str):
    spec = importlib.util.spec_from_file_location(f"sweep_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from _sweep_fixtures import remove_ray_tmpdir, short_ray_tmpdir

    path = tmp_path_factory.mktemp("sweep")
    ray_tmp = short_ray_tmpdir()  # Ray's session files, removed below instead of left in /tmp/ray
    mp = pytest.MonkeyPatch()
    mp.setenv("CXRTUNE_CACHE", str(path / "cache"))
    mp.setenv("RAY_TMPDIR", ray_tmp)
    mp.chdir(path)
    yield path
    if ray.is_initialized():
        ray.shutdown()
    mp.undo()
    remove_ray_tmpdir(ray_tmp)


@pytest.fixture(scope="module")
def smoke_sweep(workdir):
    from cxrtune.sweep.cli import main

    script = _load_sweep_script("moco_variance")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(script.SWEEP, ["--profile", "smoke", "--storage", str(workdir / "runs"), "--tracking-uri", uri,
                                   "--cpus", "2"])
    assert code == 0
    (workdir / "driver-stdout.txt").write_text(printed.getvalue())
    return workdir / "runs" / "moco_variance", uri


def test_smoke_sweep_tracks_every_trial_in_mlflow(smoke_sweep):
    folder, uri = smoke_sweep
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cxrtune/moco_variance")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cxrtune.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cxrtune.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["cxrtune.status"] == "completed"
        assert child.data.params["method"] == "moco"
        assert "moco.temperature" in child.data.params and "optim.lr" in child.data.params
        history = client.get_metric_history(child.info.run_id, "feature_std")
        assert [m.step for m in history] == [1, 2]  # one point per epoch
        assert 0.0 <= child.data.metrics["probe_auroc_20shot"] <= 1.0
    # the study's setting was the first trial evaluated
    temps = sorted(float(c.data.params["moco.temperature"]) for c in children)
    assert 0.07 in temps


def test_smoke_sweep_exports_a_backbone_that_loads_into_torchvision(smoke_sweep):
    folder, _ = smoke_sweep
    export = folder / "export"
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(export / "backbone.pt", weights_only=True), strict=True)
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["selected_by"]["metric"] == "probe_auroc_20shot"
    assert (folder / "trials.csv").is_file() and (folder / "optuna.db").is_file()


def test_a_diverging_trial_ends_as_diverged_and_the_sweep_finishes(workdir, smoke_sweep):
    from cxrtune.sweep.cli import main

    script = _load_sweep_script("moco_variance")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code = main(script.SWEEP, ["--profile", "smoke", "--storage", str(workdir / "runs"), "--tracking-uri", uri,
                               "--name", "diverging", "--num-samples", "1",
                               "--set", "optim.lr=1e30", "--set", "optim.clip_grad_norm=0"])
    assert code == 0
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cxrtune/diverging")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("cxrtune.role") == "trial"]
    assert [c.data.tags["cxrtune.status"] for c in children] == ["diverged"]
    assert children[0].info.status == "FINISHED"


@pytest.mark.parametrize("script_name, method", [("barlow_lambda", "barlow"), ("spark_mask", "spark"),
                                                 ("dino_temperature", "dino")])
def test_every_method_sweep_runs_at_smoke_size(workdir, smoke_sweep, script_name, method):
    from cxrtune.sweep.cli import main

    script = _load_sweep_script(script_name)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code = main(script.SWEEP, ["--profile", "smoke", "--storage", str(workdir / "runs"), "--tracking-uri", uri,
                               "--num-samples", "1"])
    assert code == 0
    config = json.loads((workdir / "runs" / script_name / "export" / "config.json").read_text())
    assert config["method"] == method
    for key, value in script.SWEEP.seed_point.items():  # the study's setting ran first
        assert config[key] == pytest.approx(value)


def test_compare_methods_evaluates_the_exported_best_against_random_init(workdir, smoke_sweep, capsys):
    from cxrtune.sweep.fewshot import main

    script = _load_sweep_script("compare_methods")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code = main(script.SWEEP, ["--profile", "smoke", "--storage", str(workdir / "runs"), "--tracking-uri", uri,
                               "--from-sweeps", "moco_variance", "--baselines", "random"])
    assert code == 0
    import pandas as pd

    table = pd.read_parquet(workdir / "runs" / "compare_methods" / "results.parquet")
    assert set(table["backbone"]) == {"moco_variance", "random-resnet18"}
    assert set(table["evaluator"]) == {"probe", "finetune"}
    # every backbone saw the same episodes: the tables pair up row for row
    keys = table.groupby(["backbone", "evaluator"]).apply(lambda g: tuple(sorted(zip(g.disease, g.shots, g.trial))))
    assert keys.nunique() == 1
    assert "paired over diseases vs random-resnet18" in capsys.readouterr().out


def test_imagenet_baseline_without_local_weights_fails_with_the_file_to_fetch(workdir, smoke_sweep, capsys):
    from cxrtune.sweep.fewshot import main

    script = _load_sweep_script("fewshot_grid")
    code = main(script.SWEEP, ["--profile", "smoke", "--storage", str(workdir / "runs"),
                               "--from-sweeps", "moco_variance", "--baselines", "imagenet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet18" in err and "--imagenet-weights resnet18=PATH" in err and "download" in err


def test_trial_runs_carry_config_results_and_a_training_plot(smoke_sweep):
    folder, uri = smoke_sweep
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cxrtune/moco_variance")
    child = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("cxrtune.role") == "trial"][0]
    names = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"params.json", "result.json", "metrics.jsonl", "initial_probe_results.parquet", "plots"} <= names
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/training_curves.png"]


def test_summary_names_the_trial_and_epoch_of_the_exported_checkpoint(workdir, smoke_sweep):
    folder, _ = smoke_sweep
    line = next(l for l in (workdir / "driver-stdout.txt").read_text().splitlines() if l.startswith("best trial "))
    selected = json.loads((folder / "export" / "metrics.json").read_text())["selected_report"]
    assert line.startswith(f"best trial {selected['trial_id']} at epoch {selected['objective_epoch']}: "), line
