"""What each sweep profile evaluates first, and how its validation episodes are drawn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ray import tune

from cxrtune.sweep.cli import PROFILES, _profile_config, search_points

ROOT = Path(__file__).resolve().parents[1]


def load_sweep(name: str):
    spec = importlib.util.spec_from_file_location(f"sweep_{name}_profiles", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


STUDY = {"moco.variance_weight": 1.0, "moco.temperature": 0.07, "optim.lr": 0.045}


def test_cpu_profile_evaluates_the_study_setting_then_its_own():
    sweep = load_sweep("moco_variance")
    fixed = _profile_config(sweep, PROFILES["cpu"], {})
    points = search_points(sweep, sweep.space, fixed, PROFILES["cpu"])
    assert points[0] == STUDY
    # the engine's cpu profile: the setting bench/ssl_vs_random.py measured
    assert points[1] == {"moco.variance_weight": 1.0, "moco.temperature": 0.2, "optim.lr": 0.06}
    assert len(points) == 2


@pytest.mark.parametrize("profile", ["smoke", "default", "l4"])
def test_other_profiles_start_from_the_study_setting_only(profile):
    sweep = load_sweep("moco_variance")
    fixed = _profile_config(sweep, PROFILES[profile], {})
    assert search_points(sweep, sweep.space, fixed, PROFILES[profile]) == [STUDY]


def test_a_fixed_key_leaves_the_points_and_an_out_of_range_profile_value_is_skipped():
    sweep = load_sweep("moco_variance")
    fixed = _profile_config(sweep, PROFILES["cpu"], {})
    space = {k: v for k, v in sweep.space.items() if k != "optim.lr"}  # as `--set optim.lr=...` does
    points = search_points(sweep, space, fixed, PROFILES["cpu"])
    assert points == [{"moco.variance_weight": 1.0, "moco.temperature": 0.07},
                      {"moco.variance_weight": 1.0, "moco.temperature": 0.2}]
    narrow = {**sweep.space, "moco.temperature": tune.loguniform(0.03, 0.1)}  # 0.2 lies outside
    assert search_points(sweep, narrow, fixed, PROFILES["cpu"]) == [STUDY]


def test_the_cpu_profile_tests_on_every_held_out_image_and_fits_an_hour():
    cpu = PROFILES["cpu"]
    assert cpu["test_negatives"] == "all"
    fixed = _profile_config(load_sweep("moco_variance"), cpu, {})
    # trials run side by side, one core each: the sweep lasts one trial's time limit plus start-up
    assert cpu["num_samples"] <= cpu["max_concurrent"]
    assert fixed["train.time_limit_minutes"] <= 57
    assert cpu["grace_period"] >= fixed["train.epochs"]  # two trials: ASHA has nothing to stop
