"""What each sweep profile evaluates first, and what its command line resolves to.

The driver is run through its real code path (``main`` with argv, a real ``csv`` archive of PNGs,
real caches under tmp_path) up to the point where it hands its :class:`SweepSpec` to Ray: there
``run_sweep`` is replaced by a recorder, so no Ray session starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from _sweep_fixtures import load_sweep_script as load_sweep, write_eval_archive
from cxrtune import profiles as engine_profiles
from cxrtune.errors import ConfigError
from cxrtune.methods import method_names
from cxrtune.profiles import PROFILES
from cxrtune.sweep.cli import PretrainSweep, main, resolve as resolve_config, search_points

ROOT = Path(__file__).resolve().parents[1]
METHOD_SWEEPS = tuple(p.stem for p in sorted((ROOT / "sweeps").glob("[!_]*.py"))
                      if isinstance(load_sweep(p.stem), PretrainSweep))


def _profile_config(sweep, profile, sets):
    return resolve_config(sweep, profile, sets).flat


#: The study's MoCo setting (docs: variance weight 1.0, temperature 0.07, lr 0.045).
STUDY = {"moco.variance_weight": 1.0, "moco.temperature": 0.07, "optim.lr": 0.045}


class _Handed(Exception):
    """Raised by the recorder in place of Ray: the driver got as far as starting the sweep."""


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A labelled csv archive and a cache folder, shared by the module (each cache size is built once)."""
    root = tmp_path_factory.mktemp("profiles")
    mp = pytest.MonkeyPatch()
    mp.setenv("CXRTUNE_CACHE", str(root / "cache"))
    mp.chdir(root)  # anything the driver writes by default lands here
    layout = write_eval_archive(root / "eval")
    yield {**layout, "tmp": root, "calls": [0]}
    mp.undo()


def resolve(archive, monkeypatch, *argv: str, sweep: str = "moco_variance"):
    """Run the sweep's command line until it would start Ray; return the SweepSpec it built.
    Each call is a new sweep (its own storage); the image caches are shared."""
    import cxrtune.sweep.runner as runner

    handed = {}

    def record(spec, **kwargs):
        from cxrtune.sweepstate import read_inputs

        handed["spec"] = spec
        # the data the trainable is given (tune.with_parameters), as the driver recorded it
        spec.inputs = read_inputs(kwargs["opened"].folder)
        raise _Handed

    monkeypatch.setattr(runner, "run_sweep", record)
    archive["calls"][0] += 1
    storage = archive["tmp"] / f"runs{archive['calls'][0]}"
    # nothing is tracked before Ray starts: an in-memory MLflow store spares a schema migration
    with pytest.raises(_Handed):
        main(load_sweep(sweep), ["--source", "csv", "--root", str(archive["root"]), "--storage", str(storage),
                                 "--tracking-uri", "sqlite:///:memory:", *argv])
    return handed["spec"]


@pytest.fixture(scope="module")
def smoke_spec(archive):
    mp = pytest.MonkeyPatch()
    try:
        return resolve(archive, mp, "--profile", "smoke")
    finally:
        mp.undo()


def stopping_rungs(spec) -> list[int]:
    """The epochs below max_t at which Ray's ASHA, built as the runner builds it, may stop a trial."""
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.max_t, grace_period=spec.grace_period,
                              reduction_factor=spec.reduction_factor)
    return sorted(m for bracket in scheduler._brackets for m, _ in bracket._rungs if m < spec.max_t)


def test_cpu_profile_evaluates_the_study_setting_then_its_own():
    sweep = load_sweep("moco_variance")
    fixed = _profile_config(sweep, "cpu", {})
    points = search_points(sweep, sweep.space, fixed, PROFILES["cpu"].sweep)
    assert points[0] == sweep.seed_point == STUDY
    # the second point is MoCo's cpu preset (the setting bench/ssl_vs_random.py measured), which
    # cxrtune pretrain --profile cpu trains too
    engine_cpu = engine_profiles.cpu("moco").to_flat()
    assert points[1] == {k: engine_cpu[k] for k in sweep.space}
    assert points[1] == {"moco.variance_weight": 1.0, "moco.temperature": 0.2, "optim.lr": 0.06}
    assert len(points) == 2


@pytest.mark.parametrize("profile", ["smoke", "default", "l4"])
def test_other_profiles_start_from_the_study_setting_only(profile):
    sweep = load_sweep("moco_variance")
    fixed = _profile_config(sweep, profile, {})
    assert search_points(sweep, sweep.space, fixed, PROFILES[profile].sweep) == [sweep.seed_point]
    assert sweep.seed_point == STUDY


def test_a_profile_point_equal_to_the_study_setting_is_not_evaluated_twice():
    sweep = load_sweep("moco_variance")
    cpu = PROFILES["cpu"]
    same = dataclasses.replace(cpu, budget={**cpu.budget, **sweep.seed_point})  # the profile trains the study's values
    fixed = _profile_config(sweep, same, {})
    assert {k: fixed[k] for k in sweep.space} == sweep.seed_point
    assert search_points(sweep, sweep.space, fixed, same.sweep) == [sweep.seed_point]


def test_a_fixed_key_leaves_the_points_and_an_out_of_range_profile_value_is_skipped():
    sweep = load_sweep("moco_variance")
    fixed = _profile_config(sweep, "cpu", {})
    space = {k: v for k, v in sweep.space.items() if k != "optim.lr"}  # as `--set optim.lr=...` does
    points = search_points(sweep, space, fixed, PROFILES["cpu"].sweep)
    assert points == [{"moco.variance_weight": 1.0, "moco.temperature": 0.07},
                      {"moco.variance_weight": 1.0, "moco.temperature": 0.2}]
    narrow = {**sweep.space, "moco.temperature": tune.loguniform(0.03, 0.1)}  # 0.2 lies outside
    assert search_points(sweep, narrow, fixed, PROFILES["cpu"].sweep) == [STUDY]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_resolves_to_an_engine_config_for_every_method_sweep(profile):
    """Each profile's budget keys are keys the config accepts, and land as given (a method's own
    keys for that method only); every sweep's searched keys are config keys under it."""
    assert {load_sweep(name).method for name in METHOD_SWEEPS} == set(method_names())
    for name in METHOD_SWEEPS:
        sweep = load_sweep(name)
        fixed = _profile_config(sweep, profile, {})
        assert fixed["method"] == sweep.method
        for key, value in PROFILES[profile].budget.items():
            if key.split(".")[0] in method_names() and key.split(".")[0] != sweep.method:
                assert key not in fixed, (name, key)
                continue
            assert fixed[key] == (list(value) if isinstance(value, tuple) else value), (name, key)
        for key, value in PROFILES[profile].probe.items():
            assert fixed[key] == (list(value) if isinstance(value, tuple) else value), (name, key)
        assert set(sweep.space) <= set(fixed), name
        assert set(sweep.seed_point) <= set(sweep.space), name
    # a key the config does not know is refused, naming the layer: the check above is not vacuous
    typo = dataclasses.replace(PROFILES[profile], budget={"train.epoch": 2})
    with pytest.raises(ConfigError, match=f"profile {profile}: budget: unknown config key 'train.epoch'.*train.epochs"):
        _profile_config(load_sweep("moco_variance"), typo, {})


def test_smoke_sweep_resolves_to_a_spec_whose_asha_stops_no_trial(archive, smoke_spec):
    spec = smoke_spec
    epochs = spec.param_space["train.epochs"]
    assert spec.max_t == epochs == 2
    assert spec.grace_period == epochs and stopping_rungs(spec) == []  # a smoke run is deterministic
    assert spec.points_to_evaluate[0] == STUDY
    # the searched keys stay Tune domains; everything else is fixed; the data is no param at all
    assert all(hasattr(spec.param_space[k], "sample") for k in load_sweep("moco_variance").space)
    assert not [k for k in spec.param_space if k in ("trial.cache", "trial.episodes", "trial.eval_cache",
                                                       "trial.source", "trial.eval_source")]
    assert Path(spec.inputs["trial.cache"]).is_relative_to(archive["tmp"] / "cache")
    assert Path(spec.inputs["trial.episodes"]).is_file()


def test_num_samples_and_max_concurrent_from_argv_reach_the_spec(archive, smoke_spec, monkeypatch):
    default = smoke_spec
    assert (default.num_samples, default.max_concurrent) == (PROFILES["smoke"].sweep["num_samples"],
                                                            PROFILES["smoke"].sweep["max_concurrent"])
    spec = resolve(archive, monkeypatch, "--profile", "smoke", "--num-samples", "5", "--max-concurrent", "1",
                   "--seed", "7", "--set", "optim.lr=0.01", "--name", "other")
    assert (spec.num_samples, spec.max_concurrent, spec.seed, spec.name) == (5, 1, 7, "other")
    # --set fixes a searched key: it leaves the space and the points, the rest of the seed point stays first
    assert spec.param_space["optim.lr"] == 0.01
    assert spec.points_to_evaluate == [{"moco.variance_weight": 1.0, "moco.temperature": 0.07}]


def test_the_cpu_profile_tests_on_every_held_out_image_and_fits_an_hour(archive, monkeypatch):
    import pandas as pd

    spec = resolve(archive, monkeypatch, "--profile", "cpu", "--name", "cpu")
    episodes = pd.read_parquet(spec.inputs["trial.episodes"])
    report = pd.read_parquet(Path(spec.inputs["trial.episodes"]).with_name("report_episodes.parquet"))
    listing = pd.read_csv(archive["root"] / "labels.csv")
    held_out_normals = set(listing.loc[(listing["labels"] == "No Finding") & (listing["split"] == "val"), "image_id"])
    assert len(held_out_normals) == 8
    # the held-out images are split by patient between the validation and the report episodes
    reported = {i for ids in report["test_ids"] for i in ids}
    halves = (held_out_normals - reported, held_out_normals & reported)
    assert halves[0] and halves[1]
    for normals, table in zip(halves, (episodes, report)):
        for row in table.itertuples():
            # every held-out image of its half without the finding is a test negative (not a matched sample)
            assert normals <= set(row.test_ids), row.disease
            assert sum(l == 0 for l in row.test_labels) > sum(l == 1 for l in row.test_labels)
    # trials run side by side, one core each: the sweep lasts one trial's time limit plus start-up
    assert spec.num_samples <= spec.max_concurrent and spec.resources == {"cpu": 1}
    assert spec.param_space["train.time_limit_minutes"] <= 57
    assert stopping_rungs(spec) == []  # both trials train all their epochs: ASHA has nothing to stop
    assert spec.points_to_evaluate[0] == STUDY and len(spec.points_to_evaluate) == 2


def test_a_budgeted_sweep_trains_on_wsd_judged_at_its_rungs_unless_told_otherwise():
    sweep = load_sweep("moco_variance")
    budgeted = resolve_config(sweep, "default", {}, budget_hours=1.0)
    assert budgeted.flat["optim.schedule"] == "wsd"
    assert budgeted.origin["optim.schedule"] == "sweep: budgeted (--budget-hours)"
    assert budgeted.flat["train.checkpoint_epochs"] == [1, 2]  # grace 1, reduction 2, 3 epochs
    assert resolve_config(sweep, "default", {"optim.schedule": "cosine"}, budget_hours=1.0).flat["optim.schedule"] == "cosine"
    assert resolve_config(sweep, "default", {}).flat["optim.schedule"] == "cosine"
    # l4 plans to 48 GPU hours on WSD with rungs at 12, 36, 108 of 200 epochs; study is the full recipe
    l4 = resolve_config(sweep, "l4", {})
    assert (l4.flat["optim.schedule"], l4.flat["train.epochs"], l4.flat["train.checkpoint_epochs"]) == \
        ("wsd", 200, [12, 36, 108])
    assert PROFILES["l4"].sweep["budget_hours"] == 48.0 and "budget_hours" not in PROFILES["study"].sweep
    study = resolve_config(sweep, "study", {})
    assert (study.flat["optim.schedule"], study.flat["train.epochs"]) == ("cosine", 800)
    # a wider grace period or another reduction moves the judgements with ASHA
    assert resolve_config(sweep, "default", {"train.epochs": 9}, grace=1, eta=3).flat["train.checkpoint_epochs"] == [1, 3]
