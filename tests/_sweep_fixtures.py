"""Helpers of the sweep tests: a labelled evaluation archive of real PNGs, subprocess environments
with a short Ray temp dir, and readers of what a sweep left on disk.

Import with the tests folder on ``sys.path`` (pytest's default import mode puts it there).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import shutil
import tempfile
from pathlib import Path

from _fixtures_layouts import PNG_KINDS, write_png

ROOT = Path(__file__).resolve().parents[1]
#: Labels of :func:`write_eval_archive`: two findings and a normal class that is only a negative.
EVAL_FINDINGS = ("Atelectasis", "Hernia")


def write_eval_archive(root: str | Path, train_pos: int = 20, val_pos: int = 6, normals: tuple[int, int] = (12, 8),
                       size: tuple[int, int] = (40, 48)) -> dict:
    """A ``csv`` source folder (``labels.csv`` with a split column, PNGs in the four pixel formats)
    holding enough single-label images for the default task protocol (15 training and 6
    validation positives per finding): ``train_pos``/``val_pos`` images of each of
    :data:`EVAL_FINDINGS` and ``normals`` (train, val) images labelled ``No Finding``, one patient
    per image, image ids ``ev0000``, ... Returns ``{"root", "ids", "labels": {id: label}}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = []
    for finding in EVAL_FINDINGS:
        plan += [(finding, "train")] * train_pos + [(finding, "val")] * val_pos
    plan += [("No Finding", "train")] * normals[0] + [("No Finding", "val")] * normals[1]
    labels = {}
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "path", "labels", "patient_id", "split"])
        for i, (label, split) in enumerate(plan):
            image_id = f"ev{i:04d}"
            rel = f"png/{image_id}.png"
            (root / "png").mkdir(exist_ok=True)
            write_png(root / rel, PNG_KINDS[i % len(PNG_KINDS)], *size, seed=1000 + i)
            writer.writerow([image_id, rel, label, f"EP{i:04d}", split])
            labels[image_id] = label
    return {"root": root, "ids": set(labels), "labels": labels}


def short_ray_tmpdir() -> str:
    """A short folder for Ray's sessions (its socket paths must stay under ~107 bytes), so test
    runs leave nothing under /tmp/ray; remove it with :func:`remove_ray_tmpdir`."""
    return tempfile.mkdtemp(prefix="cxr-", dir="/tmp")


def remove_ray_tmpdir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def terminal_sigint() -> None:
    """``preexec_fn`` of a driver a test interrupts: SIGINT's default disposition, as a terminal
    gives it. A job started in the background by a non-interactive shell (``.ci/run &``) ignores
    SIGINT, and that would pass on to the driver, which then never sees the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def subprocess_env(cache: Path, ray_tmpdir: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CXRTUNE_CACHE"] = str(cache)
    env["RAY_TMPDIR"] = ray_tmpdir
    env.update(extra)
    return env


def results_of(trial_dir: Path) -> list[dict]:
    """Tune's ``result.json`` of a trial, one dict per reported epoch."""
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def engine_metrics(trial_dir: Path) -> list[str]:
    """The engine's own per-epoch lines (``work/run/metrics.jsonl``) of a pretraining trial."""
    path = Path(trial_dir) / "work" / "run" / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def tune_knows_checkpoint(sweep_folder: Path, trial_id: str) -> bool:
    """Whether Tune's saved experiment state records a checkpoint of ``trial_id`` in the trial's
    checkpoint manager: only then does a restore continue the trial from it (otherwise Tune
    starts it afresh). The trial's last result can name a checkpoint the manager does not hold
    yet (a snapshot taken between the two updates), so the manager itself is read."""
    for path in sorted(Path(sweep_folder).glob("experiment_state-*.json")):
        try:
            state = json.loads(path.read_text())
            for _, runtime in state.get("trial_data", []):
                meta = json.loads(runtime)
                last = meta.get("last_result") or {}
                name = last.get("checkpoint_dir_name")
                if last.get("trial_id") != trial_id or not name:
                    continue
                manager = bytes.fromhex((meta.get("checkpoint_manager") or {}).get("value", ""))
                if name.encode() in manager:
                    return True
        except (OSError, ValueError, AttributeError):  # being rewritten, or a layout this Ray lacks
            return False
    return False


def load_sweep_script(name: str):
    """The ``SWEEP`` a script in sweeps/ declares, loaded as the script's own module (with sweeps/ on
    the path, as when the script runs)."""
    import importlib.util
    import sys

    if str(ROOT / "sweeps") not in sys.path:
        sys.path.append(str(ROOT / "sweeps"))

    spec = importlib.util.spec_from_file_location(f"sweep_script_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


def write_tune_trial(folder: Path, trial_id: str, values: list[float], seed: int,
                     metric: str = "probe_auroc_20shot") -> Path:
    """A trial folder as Tune and the trainable leave it: params.json, one report per value in
    result.json, each naming a checkpoint folder that holds a backbone."""
    from cxrtune.models.backbone import build_backbone, save_backbone

    trial_dir = Path(folder) / f"pretrain_{trial_id}"
    trial_dir.mkdir(parents=True)
    (trial_dir / "params.json").write_text(json.dumps({"method": "moco", "optim.lr": 0.01 * seed}))
    lines = []
    for i, value in enumerate(values, start=1):
        name = f"checkpoint_{i:06d}"
        save_backbone(build_backbone("resnet18", seed=seed * 100 + i), trial_dir / name / "backbone.pt")
        lines.append(json.dumps({metric: value, "training_iteration": i, "checkpoint_dir_name": name,
                                 "trial_id": trial_id}))
    (trial_dir / "result.json").write_text("\n".join(lines) + "\n")
    return trial_dir
