"""A sweep's state under everyday accidents: bad arguments, a storage that is a file or read-only,
a dead tracking server, two drivers of one sweep, two sweeps of one name in one MLflow store, a
resume with other data arguments or another tracking store, a GPU asked for on a machine without
one, and a disk that fills up under the trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from _sweep_fixtures import ROOT, remove_ray_tmpdir, short_ray_tmpdir, subprocess_env, terminal_sigint
from _print_config import parse_config_table
from cxrtune import sweepstate

SWEEP = ROOT / "sweeps" / "moco_variance.py"
DRIVER = Path(__file__).with_name("_sweep_driver.py")
PHANTOM_OPTIONS = ("-o", "n_pretrain=96", "-o", "train_pos=4", "-o", "val_pos=4", "-o", "train_neg=8",
                   "-o", "val_neg=8")


def _sweep_main(argv: list[str]) -> int:
    import moco_variance  # noqa: F401  (sweeps/ is on sys.path below)

    return moco_variance.main(moco_variance.SWEEP, argv)


@pytest.fixture(scope="module", autouse=True)
def _sweeps_on_path():
    sys.path.insert(0, str(ROOT / "sweeps"))
    yield
    sys.path.remove(str(ROOT / "sweeps"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ray_tmp = short_ray_tmpdir()
    yield subprocess_env(tmp_path_factory.mktemp("cache"), ray_tmp, TUNE_GLOBAL_CHECKPOINT_S="1")
    remove_ray_tmpdir(ray_tmp)


def _command(tmp: Path, *extra: str, storage: Path | None = None, uri: str | None = None,
             samples: int = 2) -> list[str]:
    return [sys.executable, str(SWEEP), "--profile", "smoke", "--no-report", "--num-samples", str(samples), "--cpus", "2",
            "--storage", str(storage or tmp / "runs"),
            *(("--tracking-uri", uri or f"sqlite:///{tmp / 'mlflow.db'}")), *PHANTOM_OPTIONS, *extra]


# -- arguments refused before anything runs ------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--num-samples", "0"], "argument --num-samples: 0 is out of range; use an integer >= 1"),
    (["--num-samples", "-3"], "argument --num-samples: -3 is out of range; use an integer >= 1"),
    (["--num-samples", "two"], "argument --num-samples: 'two' is not an integer"),
    (["--max-concurrent", "0"], "argument --max-concurrent: 0 is out of range"),
    (["--cpus", "0"], "argument --cpus: 0 is out of range"),
    (["--gpu", "0"], "argument --gpu: 0 is out of range; use a finite number > 0"),
    (["--gpu", "-1"], "argument --gpu: -1 is out of range"),
    (["--time-budget", "0"], "argument --time-budget: 0 is out of range"),
    (["--budget-hours", "0"], "argument --budget-hours: 0 is out of range"),
    (["--audit-fraction", "1.5"], "argument --audit-fraction: 1.5 is out of range; use a share between 0 and 1"),
    (["--audit-fraction", "most"], "argument --audit-fraction: 'most' is not a number"),
    (["--profile", "huge"], "argument --profile: invalid choice: 'huge'"),
])
def test_bad_arguments_are_refused_with_the_valid_range(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _sweep_main([*argv, "--storage", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_storage_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "runs"
    target.write_text("not a folder")
    assert _sweep_main(["--storage", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--storage {target} is a file, not a folder" in err
    assert target.read_text() == "not a folder"


def test_read_only_storage_is_refused(tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        assert _sweep_main(["--storage", str(mount / "runs")]) == 2
        err = capsys.readouterr().err
        assert f"--storage {mount / 'runs'}: {mount} is not writable (Read-only file system)" in err
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_unreachable_tracking_server_is_named_in_seconds_and_nothing_is_written(tmp_path, capsys):
    started = time.monotonic()
    code = _sweep_main(["--storage", str(tmp_path / "runs"), "--tracking-uri", "http://127.0.0.1:9"])
    elapsed = time.monotonic() - started
    assert code == 2
    assert "tracking server http://127.0.0.1:9 is unreachable" in capsys.readouterr().err
    assert elapsed < 20
    assert not (tmp_path / "runs").exists()  # no half-made sweep folder for a plain rerun to refuse


def test_a_tracking_store_in_a_missing_folder_is_refused(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    assert _sweep_main(["--storage", str(tmp_path / "runs"), "--tracking-uri", uri]) == 2
    assert f"tracking URI {uri}: folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_resume_of_nothing_leaves_no_folder(tmp_path, capsys):
    assert _sweep_main(["--storage", str(tmp_path / "runs"), "--resume", "--name", "typo"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "typo").exists()


# -- the driver lock and the SQLite store ----------------------------------------------------------
_HOLD = """
import sys, time
from cxrtune.sweepstate import hold_driver_lock
with hold_driver_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_the_driver_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "sweep"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(sweepstate.SweepBusyError, match=rf"in use by process {holder.pid} on host "):
            with sweepstate.hold_driver_lock(folder):
                pass
    finally:
        holder.kill()  # a dead driver: SIGKILL, no cleanup of its own
        holder.wait()
    with sweepstate.hold_driver_lock(folder):  # the OS released the lock with the process
        assert json.loads((folder / sweepstate.HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert not (folder / sweepstate.HOLDER_FILE).exists()


_CREATE = """
import sys
from cxrtune.sweepstate import create_sqlite_store
create_sqlite_store(sys.argv[1])
print("ok", flush=True)
"""


def test_four_processes_create_one_new_sqlite_store_together(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(4)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outputs]
    client = mlflow.tracking.MlflowClient(uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]


# -- one sweep, its record and its driver ------------------------------------------------------------
@pytest.mark.slow
def test_one_driver_per_sweep_and_resume_keeps_the_sweeps_arguments(tmp_path, env):
    folder = tmp_path / "runs" / "moco_variance"
    log = tmp_path / "first.txt"
    epochs = ("--set", "train.epochs=6")
    with open(log, "w") as out:
        first = subprocess.Popen(_command(tmp_path, *epochs), env=env, cwd=tmp_path, start_new_session=True,
                                 preexec_fn=terminal_sigint,
                                 stdout=out, stderr=subprocess.STDOUT, text=True)

    def wait_for(done) -> None:
        deadline = time.time() + 240
        while not done():
            assert time.time() < deadline and first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)

    try:
        # as soon as Tune has written its state (so --resume finds a sweep to resume), before the
        # trials run: the checks then overlap the Ray start-up and all six epochs, not just five
        wait_for(lambda: (folder / "tuner.pkl").is_file())
        # a second driver of the same sweep, with or without --resume, is refused at once
        for extra in ((), ("--resume",)):
            started = time.monotonic()
            second = subprocess.run(_command(tmp_path, *epochs, *extra), env=env, cwd=tmp_path, capture_output=True,
                                    text=True, timeout=120)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert f"is in use by process {first.pid} on host" in second.stderr
            assert time.monotonic() - started < 30
        wait_for(lambda: " epoch 1:" in log.read_text())  # a trial to cut off
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    identity = json.loads((folder / "sweep.json").read_text())
    assert identity["record"]["source"] == "phantom" and identity["record"]["profile"] == "smoke"

    # a resume with other data arguments is refused, showing the recorded values
    for extra, shown in ((("--source", "csv", "--root", str(tmp_path)), "source: recorded 'phantom', given 'csv'"),
                         (("-o", "n_pretrain=50"), "options: recorded"),
                         (("--profile", "default"), "profile: recorded 'smoke', given 'default'"),
                         (("--set", "train.epochs=9"), "set: recorded ['train.epochs=6'], given ['train.epochs=6', 'train.epochs=9']")):
        refused = subprocess.run([*_command(tmp_path, *epochs, "--resume"), *extra], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert shown in refused.stderr, refused.stderr
    # a resume that names a dead tracking server is refused in seconds
    dead = subprocess.run(_command(tmp_path, *epochs, "--resume", uri="http://127.0.0.1:9"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert dead.returncode == 2 and "http://127.0.0.1:9 is unreachable" in dead.stderr

    # --resume with only the sweep's name takes everything else from its record, and
    # --tracking-uri moves its tracking to another store (recorded in sweep.json)
    new_uri = f"sqlite:///{tmp_path / 'moved.db'}"
    resumed = subprocess.run([sys.executable, str(SWEEP), "--resume", "--storage", str(tmp_path / "runs"),
                              "--tracking-uri", new_uri, "--cpus", "2"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep moco_variance" in resumed.stdout and "profile smoke, source phantom" in resumed.stdout
    assert json.loads((folder / "sweep.json").read_text())["tracking_uri"] == new_uri
    client = mlflow.tracking.MlflowClient(new_uri)
    runs = client.search_runs([client.get_experiment_by_name("cxrtune/moco_variance").experiment_id])
    assert {r.data.tags["cxrtune.sweep_id"] for r in runs} == {identity["sweep_id"]}
    # the trials the Ctrl-C cut off ran on under the new store, found by the sweep's id and their own
    old = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old_runs = old.search_runs([old.get_experiment_by_name("cxrtune/moco_variance").experiment_id])
    cut = {r.data.tags["cxrtune.trial_id"] for r in old_runs
           if r.data.tags.get("cxrtune.role") == "trial" and r.data.tags.get("cxrtune.status") == "interrupted"}
    assert cut
    moved = {r.data.tags["cxrtune.trial_id"]: r for r in runs if r.data.tags["cxrtune.role"] == "trial"}
    assert set(moved) == cut
    assert all(r.data.tags["cxrtune.status"] in ("completed", "pruned") for r in moved.values())
    assert [r.data.tags["cxrtune.role"] for r in runs].count("sweep") == 1


@pytest.mark.slow
def test_two_sweeps_of_one_name_never_touch_each_others_runs(tmp_path, env):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run(storage: str) -> str:
        done = subprocess.run([sys.executable, str(DRIVER), "--storage", str(tmp_path / storage), "--uri", uri,
                               "--markers", str(tmp_path / storage / "m"), "--samples", "2", "--sleep", "0.1"],
                              env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads((tmp_path / storage / "synthetic" / "sweep.json").read_text())["sweep_id"]

    first_id = run("a")
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cxrtune/synthetic")
    before = {r.info.run_id: (r.info.status, r.data.tags.get("cxrtune.status"))
              for r in client.search_runs([experiment.experiment_id])}
    second_id = run("b")
    assert first_id != second_id
    runs = client.search_runs([experiment.experiment_id])
    by_sweep = {}
    for r in runs:
        by_sweep.setdefault(r.data.tags["cxrtune.sweep_id"], []).append(r)
    assert sorted(by_sweep) == sorted([first_id, second_id])
    for sweep_id, group in by_sweep.items():
        roles = sorted(r.data.tags["cxrtune.role"] for r in group)
        assert roles == ["sweep", "trial", "trial"], (sweep_id, roles)
        parent = next(r for r in group if r.data.tags["cxrtune.role"] == "sweep")
        assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                   for r in group if r.data.tags["cxrtune.role"] == "trial")
    # the first sweep's runs are as it left them
    after = {r.info.run_id: (r.info.status, r.data.tags.get("cxrtune.status")) for r in by_sweep[first_id]}
    assert after == before


# -- GPUs and full disks ------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_explicit_gpu_share_on_a_machine_without_gpus_is_refused(tmp_path, env):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(_command(tmp_path, "--gpu", "1"), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--gpu 1: this Ray cluster has no GPU" in done.stderr
    assert not list((tmp_path / "runs" / "moco_variance").glob("pretrain_trainable_*"))


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fills_the_disk_says_so_and_exits_non_zero(tmp_path, env):
    mount = tmp_path / "small"
    mount.mkdir()
    # room for the driver's files, not for a ResNet checkpoint (~45 MB)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        command = _command(tmp_path, storage=mount / "runs", samples=1)
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        assert "no trial of sweep moco_variance completed" in result.stderr
        assert "OSError: [Errno 28] No space left on device" in result.stderr
        assert "No space left on device" in result.stdout  # the summary's list of causes
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_print_config_shows_each_value_and_where_it_comes_from_and_writes_nothing(tmp_path, capsys):
    assert _sweep_main(["--print-config", "--profile", "smoke", "--set", "train.epochs=5",
                        "--storage", str(tmp_path / "runs")]) == 0
    rows = parse_config_table(capsys.readouterr().out)
    assert rows["train.epochs"] == ("5", "--set")
    assert rows["train.batch_size"] == ("16", "profile smoke: scale")
    assert rows["train.keep_checkpoints"] == ("1", "profile smoke: budget")
    assert rows["optim.lr"] == ("loguniform(0.005, 0.2)", "searched; seed point 0.045")
    assert rows["moco.temperature"] == ("loguniform(0.03, 0.3)", "searched; seed point 0.07")
    assert rows["moco.queue_size"] == ("64", "method moco: smoke preset")
    assert rows["model.arch"] == ("'resnet18'", "profile smoke: scale")
    assert rows["method"] == ("'moco'", "sweep script moco_variance")
    # the in-loop probe's settings are config keys like any other
    assert rows["probe.shots"] == ("[5, 20]", "profile smoke: probe") and rows["probe.input_size"][0] == "32"
    assert rows["probe.linear.cv_folds"] == ("5", "default")
    assert not [k for k in rows if k.split(".")[0] in ("dino", "barlow", "spark")]
    assert not (tmp_path / "runs").exists()


def test_print_config_of_a_few_shot_sweep_and_a_bad_set_key_named_with_its_layer(tmp_path, capsys):
    from _sweep_fixtures import load_sweep_script
    from cxrtune.sweep.fewshot import main as fewshot_main

    grid = load_sweep_script("fewshot_grid")
    assert fewshot_main(grid, ["--print-config", "--profile", "cpu", "--set", "eval.trials=3",
                               "--storage", str(tmp_path / "runs")]) == 0
    rows = parse_config_table(capsys.readouterr().out)
    assert rows["eval.trials"] == ("3", "--set") and rows["eval.input_size"] == ("64", "profile cpu: few-shot")
    assert rows["eval.shots"] == ("[1, 5, 10, 20, 50]", "profile cpu: few-shot")
    assert rows["eval.evaluators"][1].startswith("grid")
    assert _sweep_main(["--set", "moco.temprature=0.1", "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "--set: unknown config key 'moco.temprature'" in err and "did you mean moco.temperature" in err
    assert _sweep_main(["--set", "dino.out_dim=8", "--storage", str(tmp_path / "runs")]) == 2
    assert "'dino.out_dim' belongs to method dino" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_empty_name_is_refused_not_read_as_the_default(tmp_path, capsys):
    assert _sweep_main(["--name", "", "--storage", str(tmp_path / "runs")]) == 2
    assert "sweep name '': use a non-empty name without slashes or spaces" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resuming_a_sweep_of_an_earlier_format_is_refused_clearly(tmp_path, capsys):
    """Sweeps made before a trial's config held one method's block cannot be resumed; the error says
    so, and nothing in the folder is changed."""
    folder = tmp_path / "runs" / "moco_variance"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")  # what Tune checks for a restorable experiment
    identity = {"format": 1, "sweep_id": "0" * 32, "name": "moco_variance", "record": {"profile": "smoke"},
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (folder / "sweep.json").write_text(json.dumps(identity))
    before = sorted(p.name for p in folder.iterdir())
    assert _sweep_main(["--resume", "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "made by an earlier version of cxrtune (sweep format 1" in err and "cannot be resumed" in err
    assert "Start a new sweep with --name" in err
    assert sorted(p.name for p in folder.iterdir()) == before
    assert json.loads((folder / "sweep.json").read_text()) == identity
