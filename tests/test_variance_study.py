"""bench/variance_study.py: plain MoCo and the variance term side by side under the study's conditions,
on the same seed, data and episodes (tiny sizes, CPU)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from _bench import load_bench


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("variance_study")
    bench = load_bench("variance_study")
    bench.main(["--weights", "0", "1", "--seeds", "3", "--epochs", "2", "--n-pretrain", "256", "--size", "32",
                "--probe-every", "1", "--trials", "2", "--val-pos", "10", "--jobs", "2", "--out", str(out)])
    return bench, out


def test_each_weight_trains_under_the_stated_conditions_with_its_own_weight(study):
    bench, out = study
    for weight in (0.0, 1.0):
        run = out / f"w{weight:g}-seed3"
        config = json.loads((run / "run" / "config.json").read_text())
        assert config["moco.variance_weight"] == weight and config["train.seed"] == 3
        assert config["moco.queue_size"] == 128  # half the 256 pretraining images
        for key, value in bench.CONDITIONS.items():
            assert config[key] == value, key
        metrics = pd.read_json(run / "run" / "metrics.jsonl", lines=True)
        assert list(metrics["epoch"]) == [1, 2]
        # the loss the run minimised is InfoNCE plus its own weight times the variance term
        assert (metrics["ssl_loss"] - (metrics["infonce"] + weight * metrics["variance"])).abs().max() < 1e-4


def test_runs_share_their_random_init_and_episodes_and_are_probed_every_checkpoint(study):
    _, out = study
    plain = pd.read_parquet(out / "w0-seed3" / "probe.parquet")
    term = pd.read_parquet(out / "w1-seed3" / "probe.parquet")
    assert sorted(plain["epoch"].unique()) == sorted(term["epoch"].unique()) == [0, 1, 2]
    key = ["disease", "shots", "trial"]
    start_plain = plain[plain["epoch"] == 0].sort_values(key).reset_index(drop=True)
    start_term = term[term["epoch"] == 0].sort_values(key).reset_index(drop=True)
    pd.testing.assert_series_equal(start_plain["auroc"], start_term["auroc"])
    final_plain = plain[plain["epoch"] == 2].sort_values(key)["auroc"].to_numpy()
    final_term = term[term["epoch"] == 2].sort_values(key)["auroc"].to_numpy()
    assert len(final_plain) == len(final_term) and (final_plain != final_term).any()  # two different backbones


def test_summary_compares_each_weight_with_random_init_and_plain_moco(study):
    _, out = study
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["weight"]: row for row in summary["weights"]}
    assert set(rows) == {0.0, 1.0}
    assert "vs_plain" not in rows[0.0] and "vs_plain" in rows[1.0]
    for row in rows.values():
        low, high = row["vs_random_ci"]
        assert low <= row["vs_random"] <= high
        assert row["vs_random"] == pytest.approx(row["probe"] - row["random_init"], abs=1e-9)
        assert row["feature_std"]["first"] > 0 and row["effective_rank"]["last"] > 0
    assert rows[0.0]["random_init"] == rows[1.0]["random_init"]
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| variance weight |" in (out / "summary.md").read_text()
    assert json.loads((out / "conditions.json").read_text())["weights"] == [0.0, 1.0]


def test_summarise_refuses_a_folder_without_finished_runs(tmp_path):
    bench = load_bench("variance_study")
    with pytest.raises(SystemExit, match="holds no finished runs"):
        bench.main(["--summarise", str(tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["--weights", "-1"], "--weights must be >= 0, got [-1.0]"),
    (["--queue", "0"], "--queue must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs, --probe-every, --jobs and --threads must be at least 1"),
    (["--jobs", "0"], "--epochs, --probe-every, --jobs and --threads must be at least 1"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    bench = load_bench("variance_study")
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
