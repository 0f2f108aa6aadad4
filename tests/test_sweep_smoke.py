"""The main job end to end at smoke size: `python sweeps/moco_variance.py --profile smoke`.

One Ray session for the module; everything (cache, sweeps, MLflow store) under tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import torchvision

from _sweep_fixtures import load_sweep_script
from cxrtune.methods import method_names

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]


def _objective(table, shots: int) -> float:
    """The sweep's objective from a probe table: mean over findings of the per-finding mean AUROC."""
    rows = table[table["shots"] == shots]
    per_finding = {d: rows.loc[rows["disease"] == d, "auroc"].sum() / (rows["disease"] == d).sum()
                   for d in set(rows["disease"])}
    return sum(per_finding.values()) / len(per_finding)


def _artifact_table(client, run_id: str, path: str, folder: Path):
    import pandas as pd

    dst = folder.parent / "downloaded" / run_id
    dst.mkdir(parents=True, exist_ok=True)
    return pd.read_parquet(client.download_artifacts(run_id, path, str(dst)))


def _optuna_trials(folder: Path):
    """The sweep's Optuna study, trials in creation order."""
    import optuna

    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


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

    sweep = load_sweep_script("moco_variance")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(sweep, ["--profile", "smoke", "--storage", str(workdir / "runs"), "--tracking-uri", uri,
                            "--cpus", "2", "--budget-hours", "1", "--num-samples", "2"])
    assert code == 0
    (workdir / "driver-stdout.txt").write_text(printed.getvalue())
    return workdir / "runs" / "moco_variance", uri


def test_a_budgeted_sweep_measures_plans_and_reports_against_its_budget(smoke_sweep, workdir):
    folder, uri = smoke_sweep
    printed = (workdir / "driver-stdout.txt").read_text()
    record = json.loads((folder / "plan.json").read_text())
    plan, cost = record["plan"], record["cost"]
    assert plan["trials"] == 2 and plan["budget_hours"] == 1.0 and plan["rungs"] == [2]
    assert cost["epoch_s"] > 0 and cost["judge_s"] > 0 and plan["projected_hours"] < 1.0
    assert "measuring a trial's rate" in printed and "plan: 2 trials" in printed
    used = json.loads((folder / "budget.json").read_text())
    assert 0 < used["spent_s"] < 3600 and used["refusals"] == []
    assert f"budget: {used['spent_s'] / 3600:.2f} h used of 1 h" in printed
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cxrtune/moco_variance").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cxrtune.role") == "sweep")
    assert parent.data.params["plan.trials"] == "2" and parent.data.params["plan.budget_hours"] == "1.0"


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
        # a MoCo trial's params are MoCo's block and the engine's, probe and health keys: no other method's
        others = [m for m in method_names() if m != "moco"]
        assert not [k for k in child.data.params if k.split(".")[0] in others]
        assert child.data.params["probe.input_size"] == "32" and "trial.cache" not in child.data.params
        # a name a person can read: the sweep, the trial and its searched values
        params = child.data.params
        words = child.info.run_name.split(" ")
        assert words[:2] == ["moco_variance", child.data.tags["cxrtune.trial_id"]]
        assert sorted(words[2:]) == sorted([f"variance_weight={float(params['moco.variance_weight']):.3g}",
                                            f"temperature={float(params['moco.temperature']):.3g}",
                                            f"lr={float(params['optim.lr']):.3g}"])
        history = client.get_metric_history(child.info.run_id, "feature_std")
        assert [m.step for m in history] == [1, 2]  # one point per epoch
        # the objective it reports is the one its probe table gives: mean over the findings of
        # each finding's mean 20-shot AUROC, recomputed here from the episodes' rows; the same
        # for random init (the trial's starting weights) and its own table
        final = _artifact_table(client, child.info.run_id, "last_checkpoint/probe_results.parquet", folder)
        initial = _artifact_table(client, child.info.run_id, "initial_probe_results.parquet", folder)
        for table in (final, initial):
            assert len(table[table["shots"] == 20]) == table["disease"].nunique() * 2  # 2 trials per finding
            assert table["auroc"].between(0.0, 1.0).all()
        assert child.data.metrics["probe_auroc_20shot"] == pytest.approx(_objective(final, 20), abs=1e-6)
        assert child.data.metrics["probe_auroc_5shot"] == pytest.approx(_objective(final, 5), abs=1e-6)
        assert child.data.metrics["initial_probe_auroc_20shot"] == pytest.approx(_objective(initial, 20), abs=1e-6)
    # the study's setting was the first trial evaluated: Optuna's trial 0, and Tune's first trial
    seed_point = load_sweep_script("moco_variance").seed_point
    trials = _optuna_trials(folder)
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].params == pytest.approx(seed_point)
    assert trials[1].params != pytest.approx(seed_point)
    tracked = [{k: float(c.data.params[k]) for k in seed_point} for c in children]
    for trial in trials:  # each Optuna trial is one tracked trial, with the params Optuna gave it
        assert sum(params == pytest.approx(trial.params) for params in tracked) == 1


def test_smoke_sweep_exports_a_backbone_that_loads_into_torchvision(smoke_sweep):
    folder, _ = smoke_sweep
    export = folder / "export"
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(export / "backbone.pt", weights_only=True), strict=True)
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["selected_by"]["metric"] == "probe_auroc_20shot"
    config = json.loads((export / "config.json").read_text())
    card = (export / "MODEL_CARD.md").read_text()
    assert config["method"] == "moco" and "moco.temperature" in config and "moco.temperature" in card
    others = [m for m in method_names() if m != "moco"]
    assert not [k for k in config if k.split(".")[0] in others]
    assert not [m for m in others if f"{m}." in card]
    assert (folder / "trials.csv").is_file() and (folder / "optuna.db").is_file()


def test_the_winner_is_chosen_on_validation_episodes_and_reported_on_other_patients(smoke_sweep, workdir):
    """Selection and report apart: the report episodes' test images belong to other patients than
    the validation episodes'; the summary, the export's card and metrics and the HTML report give
    the winner against random init on each set, saying which is which."""
    import pandas as pd

    from cxrtune.data.cache import ImageCache

    folder, _ = smoke_sweep
    validation = pd.read_parquet(folder / "episodes.parquet")
    report = pd.read_parquet(folder / "report_episodes.parquet")
    index = ImageCache.open(json.loads((folder / "inputs.json").read_text())["trial.eval_cache"]).index
    patient = dict(zip(index["image_id"], index["patient_id"]))
    tested = [{patient[i] for ids in episodes["test_ids"] for i in ids} for episodes in (validation, report)]
    assert tested[0] and tested[1] and not tested[0] & tested[1]
    assert set(report["disease"]) <= set(validation["disease"]) and len(report) > 0
    results = pd.read_parquet(folder / "report_results.parquet")
    assert set(results["backbone"]) == {"best", "random"}
    assert len(results) == 2 * len(report)  # both backbones on every report episode
    saved = json.loads((folder / "report_comparison.json").read_text())
    best20 = results[(results["backbone"] == "best") & (results["shots"] == 20)]
    assert saved["report"]["best"] == pytest.approx(best20.groupby("disease")["auroc"].mean().mean())
    printed = (workdir / "driver-stdout.txt").read_text()
    assert "on the validation episodes it was chosen on (selection inflates this)" in printed
    assert f"reported on {len(report)} report episodes (test images of other patients, never used" in printed
    card = (folder / "export" / "MODEL_CARD.md").read_text()
    assert "## Against random init" in card and "never used for selection" in card
    metrics = json.loads((folder / "export" / "metrics.json").read_text())
    assert metrics["against_random_init"]["report"]["trial_id"] == metrics["trial_id"]
    assert "never used for selection" in (folder / "report" / "report.html").read_text()


def test_the_sweep_writes_its_report_when_it_ends(smoke_sweep, workdir):
    """By default (no --no-report) the sweep's HTML report is written and logged to the parent run;
    the end-of-sweep report leaves out the slow Grad-CAM section."""
    folder, uri = smoke_sweep
    html = (folder / "report" / "report.html").read_text()
    assert "moco_variance" in html and "Localisation" not in html
    assert f"report: {folder / 'report' / 'report.html'}" in (workdir / "driver-stdout.txt").read_text()
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cxrtune/moco_variance")
    [parent] = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("cxrtune.role") == "sweep"]
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_diverging_trial_ends_as_diverged_and_the_sweep_finishes(workdir, smoke_sweep):
    from cxrtune.sweep.cli import main

    sweep = load_sweep_script("moco_variance")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code = main(sweep, ["--profile", "smoke", "--no-report", "--storage", str(workdir / "runs"), "--tracking-uri", uri,
                        "--name", "diverging", "--num-samples", "1",
                        "--set", "optim.lr=1e30", "--set", "optim.clip_grad_norm=0"])
    assert code == 0
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cxrtune/diverging")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("cxrtune.role") == "trial"]
    assert [c.data.tags["cxrtune.status"] for c in children] == ["diverged"]
    assert children[0].info.status == "FINISHED"
    assert not (workdir / "runs" / "diverging" / "report").exists()  # --no-report


def _method_sweeps() -> dict[str, str]:
    """Sweep script -> method, for every pretraining sweep in sweeps/ (moco_variance runs in the fixture)."""
    from cxrtune.sweep.cli import PretrainSweep

    found = {}
    for path in sorted((ROOT / "sweeps").glob("[!_]*.py")):
        sweep = load_sweep_script(path.stem)
        if isinstance(sweep, PretrainSweep):
            found[path.stem] = sweep.method
    return found


def test_every_registered_method_has_a_sweep():
    assert set(_method_sweeps().values()) == set(method_names())


@pytest.mark.parametrize("script_name", [name for name in _method_sweeps() if name != "moco_variance"])
def test_every_method_sweep_runs_at_smoke_size(workdir, smoke_sweep, script_name, capsys):
    from cxrtune.sweep.cli import main

    sweep = load_sweep_script(script_name)
    method = sweep.method
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    # one sweep keeps the study's protocol: the winner chosen and reported on one set of episodes
    single = ["--no-report-split"] if method == "barlow" else []
    code = main(sweep, ["--profile", "smoke", "--no-report", "--storage", str(workdir / "runs"), "--tracking-uri",
                        uri, "--num-samples", "1", "--set", "train.epochs=1", *single])  # one epoch: the plumbing
    assert code == 0
    folder = workdir / "runs" / script_name
    assert (folder / "report_episodes.parquet").is_file() != bool(single)
    if single:
        assert "on the same episodes" in capsys.readouterr().out and not (folder / "report_comparison.json").exists()
    config = json.loads((folder / "export" / "config.json").read_text())
    assert config["method"] == method
    for key, value in sweep.seed_point.items():  # the study's setting ran first
        assert config[key] == pytest.approx(value)


def test_compare_methods_evaluates_the_exported_best_against_random_init(workdir, smoke_sweep, capsys):
    from cxrtune.sweep.fewshot import main

    sweep = load_sweep_script("compare_methods")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    code = main(sweep, ["--profile", "smoke", "--no-report", "--storage", str(workdir / "runs"), "--tracking-uri",
                        uri, "--from-sweeps", "moco_variance", "--baselines", "random"])
    assert code == 0
    import pandas as pd

    table = pd.read_parquet(workdir / "runs" / "compare_methods" / "results.parquet")
    assert set(table["backbone"]) == {"moco_variance", "random-resnet18"}
    assert set(table["evaluator"]) == {"probe", "finetune"}
    # every backbone saw the same episodes: the tables pair up row for row
    keys = table.groupby(["backbone", "evaluator"]).apply(lambda g: tuple(sorted(zip(g.disease, g.shots, g.trial))))
    assert keys.nunique() == 1
    out = capsys.readouterr().out
    assert "paired over diseases vs random-resnet18" in out
    # packed by measured memory and the cores (no GPU here, no --cpu given): printed and logged
    packing = next(line for line in out.splitlines() if line.startswith("packing: "))
    assert packing.startswith("packing: finetune trials need ") and "CPU each" in packing, packing
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cxrtune/compare_methods")
    [parent] = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("cxrtune.role") == "sweep"]
    params = parent.data.params
    assert params["packing.device"] == "cpu" and params["packing.sizing_kind"] == "finetune"
    assert float(params["packing.peak_mib.finetune"]) > 0 and float(params["packing.peak_mib.probe"]) > 0
    assert parent.data.tags["cxrtune.packing"] == packing.removeprefix("packing: ")


def test_imagenet_baseline_without_local_weights_fails_with_the_file_to_fetch(workdir, smoke_sweep, capsys):
    from cxrtune.sweep.fewshot import main

    sweep = load_sweep_script("fewshot_grid")
    code = main(sweep, ["--profile", "smoke", "--storage", str(workdir / "runs"),
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
