"""What the wheel installs, and that the sweep scripts and the report run from a checkout that is
not installed."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_and_installs_under_cxrtune():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"cxrtune." + ".".join(p.parent.relative_to(ROOT / "cxrtune").parts) if p.parent != ROOT / "cxrtune"
               else "cxrtune" for p in (ROOT / "cxrtune").rglob("__init__.py")}
    folders |= {"cxrtune.analysis", "cxrtune.trainables"}
    assert set(config["packages"]) == folders
    assert config["package-dir"] == {"cxrtune.analysis": "analysis", "cxrtune.trainables": "trainables"}


def test_the_wheel_holds_one_top_level_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("cxrtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"cxrtune"}
    for expected in ("cxrtune/analysis/report.py", "cxrtune/analysis/templates/report.html.j2",
                     "cxrtune/trainables/pretrain.py", "cxrtune/data/resources/padchest_exclusions.txt",
                     "cxrtune/methods/vicreg.py"):
        assert expected in names


def _without_install() -> dict[str, str]:
    """An environment whose interpreter sees the installed dependencies but not the editable
    install of cxrtune (``-S`` skips the .pth files that map it)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def test_a_checkout_that_is_not_installed_runs_its_sweeps_and_report(tmp_path):
    env = _without_install()
    probe = subprocess.run([sys.executable, "-S", "-c", "import cxrtune"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert probe.returncode != 0  # the check below is not vacuous: cxrtune is not importable as such
    done = subprocess.run([sys.executable, "-S", str(ROOT / "analysis" / "report.py"), "--help"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
    printed = subprocess.run([sys.executable, "-S", str(ROOT / "sweeps" / "moco_variance.py"), "--print-config"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0 and "moco.temperature" in printed.stdout, printed.stderr[-2000:]
    imported = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "import cxrtune.trainables.pretrain, cxrtune.analysis.report; "
                               "print(cxrtune.analysis.report.__file__)", str(ROOT)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert Path(imported.stdout.strip()) == ROOT / "analysis" / "report.py"


def test_a_sweep_command_line_starts_without_torch():
    """--help and refused arguments answer in a second or two: the sweep command lines import torch
    (and every method) only when a config is resolved."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cxrtune.sweep.cli, cxrtune.sweep.fewshot; "
            "import moco_variance, fewshot_grid; "
            "cxrtune.sweep.cli.build_parser(moco_variance.SWEEP).format_help(); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "sweeps")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
