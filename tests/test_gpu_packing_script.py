"""bench/gpu_packing.py, the prepared GPU script, run as the CPU check its --tiny mode is for
(about a minute on 2 cores: one Ray session, two packing levels of a two-trial grid). On a GPU
machine run it without --tiny (see its docstring); this test only proves it runs and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _sweep_fixtures import remove_ray_tmpdir, short_ray_tmpdir, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_packing_script_tiny_on_cpu_reports_every_level(tmp_path):
    ray_tmp = short_ray_tmpdir()
    try:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_packing.py"), str(tmp_path / "out"),
                               "--tiny", "--device", "cpu"], check=False, env=subprocess_env(tmp_path / "unused", ray_tmp),
                              cwd=tmp_path, capture_output=True, text=True, timeout=240)
    finally:
        remove_ray_tmpdir(ray_tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "packing.json").read_text())
    levels = report["levels"]
    assert [level["k"] for level in levels] == [1, 2]
    assert [level["share"] for level in levels] == ["--cpu 2", "--cpu 1"]
    for level in levels:
        # one checkpoint x (probe, knn) x 2 findings x shots (1, 5) x 2 trials: 16 evaluated episodes
        assert level["exit_code"] == 0 and level["errored"] == 0 and level["episodes"] == 16
        assert level["episodes_per_s"] == pytest.approx(16 / level["wall_s"], rel=0.01)
        assert level["feature_extractions"] == 1  # the probe and kNN trials shared one extraction
        assert 0 < level["peak_per_trial_gib"] < 8
        assert level["packing"] == "packing: --pack off given: " + level["share"].removeprefix("--cpu ") + " CPU each"
    assert levels[0]["speedup"] == 1.0
    assert levels[1]["speedup"] == pytest.approx(levels[0]["wall_s"] / levels[1]["wall_s"], abs=0.01)
    assert set(report["measurement"]["peaks_gib"]) == {"probe", "knn"}
    assert all(v > 0 for v in report["measurement"]["peaks_gib"].values())
    assert report["over_cap"]["outcome"] == "not applicable: memory caps are CUDA-only"
    table = (tmp_path / "out" / "packing.md").read_text()
    assert "| trials per device | share | wall s | episodes | episodes/s | speed-up |" in table
    assert "Over-cap trial: not applicable: memory caps are CUDA-only" in table


def test_the_script_never_empties_a_cache_folder_it_did_not_make(tmp_path):
    from _bench import load_bench

    bench = load_bench("gpu_packing")
    (tmp_path / "cache" / "features").mkdir(parents=True)
    (tmp_path / "cache" / "features" / "mine.npy").write_bytes(b"user data")
    with pytest.raises(SystemExit, match="was not made by bench/gpu_packing.py"):
        bench.own_cache(tmp_path)
    assert (tmp_path / "cache" / "features" / "mine.npy").read_bytes() == b"user data"
    made = bench.own_cache(tmp_path / "fresh")
    assert (made / bench.CACHE_MARKER).is_file() and bench.own_cache(tmp_path / "fresh") == made
