"""bench/dino_search.py: DINO settings chosen on validation episodes, the winner reported on
patient-disjoint report episodes (tiny sizes, CPU)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from _bench import load_bench

ARGS = ["--epochs", "1", "--n-pretrain", "128", "--size", "32", "--val-pos", "10", "--trials", "2", "--threads", "1",
        "--set", "dino.local_crop_size=16"]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino_search")
    bench = load_bench("dino_search")
    bench.main(["--settings", "preset", "centre-0.99", "--out", str(out), *ARGS])
    return bench, out


def test_winner_is_chosen_on_validation_and_reported_on_patient_disjoint_episodes(search):
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source

    _, out = search
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["setting"]: row for row in summary["settings"]}
    assert set(rows) == {"preset", "centre-0.99"}
    assert summary["chosen"] == max(rows, key=lambda name: rows[name]["validation"])
    assert summary["report"]["setting"] == summary["chosen"]
    config = json.loads((out / "centre-0.99" / "run" / "config.json").read_text())
    assert config["dino.center_momentum"] == 0.99
    index = get_cache(make_source("phantom", None, n_pretrain=128, val_pos=10), size=32).index
    patient = dict(zip(index["image_id"], index["patient_id"]))

    def patients(name):
        episodes = pd.read_parquet(out / name)
        return {patient[i] for ids in episodes["test_ids"] for i in ids}

    validation, report = patients("validation_episodes.parquet"), patients("report_episodes.parquet")
    assert validation and report and not validation & report
    for row in rows.values():
        low, high = row["vs_random_ci"]
        assert low <= row["vs_random"] <= high
        assert row["loss_last_of_uniform"] == pytest.approx(row["loss_last"] / 5.545177, rel=1e-4)  # ln 256


def test_a_second_invocation_adds_settings_without_running_the_finished_ones(search, capsys):
    bench, out = search
    before = (out / "preset" / "validation.parquet").stat().st_mtime_ns
    bench.main(["--settings", "preset", "lr-1e-3", "--out", str(out), *ARGS])
    assert "preset: finished earlier, not run again" in capsys.readouterr().out
    assert (out / "preset" / "validation.parquet").stat().st_mtime_ns == before
    summary = json.loads((out / "summary.json").read_text())
    assert {row["setting"] for row in summary["settings"]} == {"preset", "centre-0.99", "lr-1e-3"}
    assert summary["report"]["setting"] == summary["chosen"]
    # settings of another budget would not be comparable: refused, naming the difference
    with pytest.raises(SystemExit, match="--epochs: recorded 1, given 2"):
        bench.main(["--settings", "lr-2.5e-4", "--out", str(out), *ARGS[:1], "2", *ARGS[2:]])
    assert not (out / "lr-2.5e-4").exists()


def test_summarise_refuses_a_folder_without_finished_settings(tmp_path):
    bench = load_bench("dino_search")
    with pytest.raises(SystemExit, match="holds no finished settings"):
        bench.main(["--summarise", str(tmp_path)])


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--threads", "0"], ["--n-pretrain", "0"]])
def test_bad_arguments_are_refused_by_name(argv, capsys):
    bench = load_bench("dino_search")
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert "--epochs, --threads and --n-pretrain must be at least 1" in capsys.readouterr().err
