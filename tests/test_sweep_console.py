"""A sweep's console: our lines, not Ray's tables; a failed trial's error and where to read more."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _sweep_fixtures import remove_ray_tmpdir, short_ray_tmpdir, subprocess_env

DRIVER = Path(__file__).with_name("_sweep_driver.py")


@pytest.mark.slow
def test_a_failed_trial_shows_its_error_and_log_paths_on_a_quiet_console(tmp_path):
    ray_tmp = short_ray_tmpdir()
    try:
        done = subprocess.run(
            [sys.executable, str(DRIVER), "--storage", str(tmp_path / "runs"), "--uri", f"sqlite:///{tmp_path / 'm.db'}",
             "--markers", str(tmp_path / "markers"), "--samples", "2", "--sleep", "0.1", "--fail-unseeded"],
            env=subprocess_env(tmp_path / "cache", ray_tmp), capture_output=True, text=True, timeout=240)
    finally:
        remove_ray_tmpdir(ray_tmp)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "TRIALS 2 ERRORS 1" in done.stdout
    failed = [line for line in done.stderr.splitlines() if " errored: " in line]
    assert len(failed) == 1, console[-3000:]
    line = failed[0]
    assert "RuntimeError: synthetic failure of x=" in line
    error_file = Path(line.split("traceback: ", 1)[1].split(";", 1)[0])
    assert error_file.is_file() and "synthetic failure" in error_file.read_text()
    log = tmp_path / "runs" / "synthetic" / "ray-console.log"
    assert f"Ray's output: {log}" in line and log.is_file()
    # the completed trial is reported on the console too; Ray's own tables and banners are not
    assert " completed after epoch " in done.stdout or "completed after epoch" in done.stdout
    for noise in ("Configuration for experiment", "╭", "Trial status", "Started a local Ray instance"):
        assert noise not in console
    assert "Configuration for experiment" in log.read_text()
