"""Export the best trial of a sweep as a torchvision-compatible backbone.

The checkpoint is the sweep's best for ``metric`` as :mod:`cxrtune.sweepfolder` defines it (the
best report whose checkpoint is still on disk), read without importing Ray.

Output folder (default ``<sweep>/export/``):

- ``backbone.pt``: a plain ``state_dict`` with torchvision's key names and a 3-channel ``conv1``
  (the 1-channel filters spread over RGB, divided by 3, so a grey image replicated to RGB gives
  the same features). Load it with::

      model = torchvision.models.resnet18()      # or resnet50, as config.json says
      model.fc = torch.nn.Identity()             # the export has no classifier
      model.load_state_dict(torch.load("backbone.pt", weights_only=True), strict=True)

  ``--channels 1`` keeps the 1-channel ``conv1`` (then replace ``model.conv1`` with
  ``nn.Conv2d(1, 64, 7, 2, 3, bias=False)`` before loading);
- ``config.json`` (the trial's flat config), ``metrics.json`` (the chosen report and the trial's
  final one), ``MODEL_CARD.md``;
- ``.cxrtune-export`` (:data:`MARKER_FILE`): JSON saying this folder is a cxrtune export (format
  version, sweep folder, trial id, checkpoint, metric, time). It is what lets ``force`` replace it.

Overwriting (see :func:`check_export_target`): an empty or missing folder is written; a non-empty
one only with ``force``, and even then only when it is itself an export. ``force`` never deletes a
user's folder or a sweep folder. The export is written in full to a hidden temporary folder beside
the target (same parent, so the same filesystem), then swapped in: the old export is renamed aside,
the new one renamed into place, the old one removed. A failure at any step leaves the old export
as it was and no temporary folder behind.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from cxrtune.errors import CxrtuneError
from cxrtune.models.backbone import adapt_first_conv, load_backbone
from cxrtune.sweepfolder import (BACKBONE_FILE, EPISODES_FILE, EXPORT_DIR, OPTUNA_FILE, REPORT_COMPARISON,
                                 RESULTS_TABLE, TRIALS_TABLE,
                                 Checkpoint, SweepFolder)
from cxrtune.tune_files import TUNER_FILE, read_results, trial_dirs
#: Written into every export; only a folder holding it (or a pre-marker export, below) is replaced by ``force``.
MARKER_FILE = ".cxrtune-export"
MARKER_FORMAT = "cxrtune-export"
MARKER_VERSION = 1
#: What an export holds besides the marker. Exports from before the marker hold exactly these.
EXPORT_FILES = frozenset({BACKBONE_FILE, "config.json", "metrics.json", "MODEL_CARD.md"})
#: Names that mark a sweep folder (beside trial folders with params.json).
SWEEP_SIGNS = (OPTUNA_FILE, TUNER_FILE, TRIALS_TABLE, RESULTS_TABLE, EPISODES_FILE)


def torchvision_state_dict(checkpoint: Path, channels: int = 3) -> tuple[dict[str, torch.Tensor], str]:
    backbone = load_backbone(checkpoint)
    state = adapt_first_conv(backbone.torchvision_state_dict(), channels)
    return state, backbone.arch


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The export marker of ``folder`` as a dict, or None when it has none (or not a valid one)."""
    path = Path(folder) / MARKER_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _sweep_signs(folder: Path) -> list[str]:
    signs = [name for name in SWEEP_SIGNS if (folder / name).exists()]
    signs += sorted(p.name for p in folder.glob("experiment_state-*.json"))[:1]
    trials = [p.name for p in trial_dirs(folder)]
    if trials:
        signs.append(f"{len(trials)} trial folder(s) such as {sorted(trials)[0]}/")
    return signs


def _is_unmarked_export(folder: Path, entries: list[str]) -> bool:
    """An export from before the marker: exactly :data:`EXPORT_FILES`, and an export's metrics.json."""
    if set(entries) != EXPORT_FILES or not all((folder / name).is_file() for name in entries):
        return False
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and {"selected_by", "trial_id", "checkpoint"} <= set(metrics)


def check_export_target(out: Path, force: bool, sweep_folder: Path | None = None) -> bool:
    """Whether ``out`` may receive an export; True when an old export is there to be replaced.

    - missing, or an empty folder: yes;
    - a cxrtune export: only with ``force``. An export is a folder holding a valid
      :data:`MARKER_FILE`, or, for exports written before the marker existed (e.g.
      ``<sweep>/export`` left by an older sweep driver, which calls this with ``force=True``), a
      folder whose entries are exactly the files of :data:`EXPORT_FILES` with a ``metrics.json``
      that reads as an export's;
    - any other non-empty folder (a user's folder, a sweep folder): refused, with or without
      ``force``, naming it and why;
    - a file, or a folder that is or holds ``sweep_folder``: refused.
    """
    if not out.exists():
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise CxrtuneError(f"export folder {out}: {parent} is a file, so the folder cannot be created")
                break
        return False
    if not out.is_dir():
        raise CxrtuneError(f"export folder {out} is an existing file, not a folder: pass --out with a folder path")
    if sweep_folder is not None:
        target, sweep = out.resolve(), sweep_folder.resolve()
        if target == sweep or target in sweep.parents:
            raise CxrtuneError(f"export folder {out} is (or holds) the sweep folder {sweep_folder}: an export "
                               "there would replace the sweep; pass --out with a folder of its own")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    if read_marker(out) is not None or _is_unmarked_export(out, entries):
        if not force:
            raise CxrtuneError(f"export folder {out} already exists; pass --force to overwrite it")
        return True
    signs = _sweep_signs(out)
    if signs:
        why = f"it looks like a sweep folder ({', '.join(signs)})"
    elif (out / MARKER_FILE).exists():
        why = f"its {MARKER_FILE} marker is not a valid export marker"
    else:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        why = f"it holds files that are not an export's ({shown}) and no {MARKER_FILE} marker"
    raise CxrtuneError(f"export folder {out} is not empty and is not a cxrtune export: {why}. Nothing was "
                       "written; --force replaces only an earlier export, so pass --out with a new or empty "
                       "folder")


def export_best(sweep_folder: str | Path, metric: str, mode: str = "max", out: str | Path | None = None,
                force: bool = False, channels: int = 3, include_audit: bool = False) -> Path:
    """Write the best checkpoint's backbone, config, metrics, model card and marker; return the folder.

    ``force`` replaces an earlier export only (:func:`check_export_target`); the new one is built
    beside it and swapped in, so a failure leaves the old one intact. Trials of the pruning audit
    are candidates only with ``include_audit``.
    """
    sweep_folder = Path(sweep_folder)
    out = Path(out) if out else sweep_folder / EXPORT_DIR
    if channels not in (1, 3):
        raise CxrtuneError(f"channels = {channels}: use 1 or 3")
    check_export_target(out, force, sweep_folder)
    best = SweepFolder(sweep_folder).best_checkpoint(metric, mode, include_audit)
    state, arch = torchvision_state_dict(best.backbone, channels)
    final = read_results(best.trial_dir)[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        torch.save(state, tmp / BACKBONE_FILE)
        (tmp / "config.json").write_text(json.dumps(best.config, indent=2, sort_keys=True, default=str))
        metrics = {"selected_by": {"metric": metric, "mode": mode, "value": best.report[metric]},
                   "selected_report": _plain(best.report), "final_report": _plain(final),
                   "trial_id": best.trial_id, "checkpoint": str(best.folder), "include_audit": include_audit}
        against = _against_random_init(sweep_folder, best, metric)
        if against is not None:
            metrics["against_random_init"] = against
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        (tmp / "MODEL_CARD.md").write_text(model_card(best, arch, metric, channels, against))
        (tmp / MARKER_FILE).write_text(json.dumps(_marker(sweep_folder, best, metric, mode, arch, channels),
                                                  indent=2, sort_keys=True, default=str))
        # Checked again: the folder may have changed while the checkpoint was read.
        check_export_target(out, force, sweep_folder)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _marker(sweep_folder: Path, best: Checkpoint, metric: str, mode: str, arch: str,
            channels: int) -> dict[str, Any]:
    from cxrtune import __version__

    return {"format": MARKER_FORMAT, "version": MARKER_VERSION, "cxrtune_version": __version__,
            "sweep_folder": str(sweep_folder.resolve()), "trial_id": best.trial_id,
            "checkpoint": str(best.folder.resolve()), "metric": metric, "mode": mode,
            "value": best.report[metric], "arch": arch, "channels": channels,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``; an old export (or empty folder) there is renamed
    aside first, put back if the second rename fails, and removed only once the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    aside.rmdir()  # a free name in the same folder: rename needs the target not to hold anything
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _against_random_init(sweep_folder: Path, best: Checkpoint, metric: str) -> dict[str, Any] | None:
    """The sweep's comparisons of this checkpoint's trial with random init (``report_comparison.json``,
    written when the sweep ended), when they are of this trial and this metric's shot count."""
    path = sweep_folder / REPORT_COMPARISON
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    report = saved.get("report") or {}
    if report.get("trial_id") != best.trial_id or saved.get("metric", metric) != metric:
        return None
    return saved


def _plain(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "config"}


def model_card(best: Checkpoint, arch: str, metric: str, channels: int,
               against: dict[str, Any] | None = None) -> str:
    config = best.config
    method = config.get("method", "unknown")
    lines = [
        f"# cxrtune backbone: {method} {arch}",
        "",
        f"- trial: `{best.trial_id}`, checkpoint `{best.folder.name}` "
        f"(training iteration {best.report.get('training_iteration', '?')})",
        f"- selected by `{metric}` = {best.report[metric]:.4f}",
        f"- input: {channels}-channel, greyscale radiographs scaled to [0, 1] then normalised with "
        "mean 0.4776 and std 0.2674" + (" (grey replicated to RGB)" if channels == 3 else ""),
        "- output: global-average-pooled features (set `model.fc = torch.nn.Identity()` before loading)",
        "",
        "## Trial configuration",
        "",
        "| key | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(config.items())]
    if against is not None:
        lines += ["", "## Against random init", "", "| episodes | this backbone | random init | difference (95 % CI) | findings |",
                  "|---|---|---|---|---|"]
        for name, label in (("validation", "validation: the backbone was chosen on these (selection inflates it)"),
                            ("report", "report: other patients' test images, never used for selection")):
            c = against.get(name)
            if c:
                lines.append(f"| {label} | {c['best']:.3f} | {c['random']:.3f} | {c['difference']:+.3f} "
                             f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['diseases']} |")
    lines += ["", "## Metrics at the selected checkpoint", "", "| metric | value |", "|---|---|"]
    for key, value in sorted(best.report.items()):
        if isinstance(value, float) and not isinstance(value, bool):
            lines.append(f"| `{key}` | {value:.4f} |")
    lines += ["", "Intended use: research on few-shot detection of findings in chest radiographs. "
              "Not a medical device; not validated for clinical use.", ""]
    return "\n".join(lines)


def register_in_mlflow(export_folder: Path, model_name: str, tracking_uri: str | None = None,
                       run_id: str | None = None) -> str:
    """Log the export as artifacts and register it as a model version with the alias ``best``."""
    from mlflow.tracking import MlflowClient

    from cxrtune.tracking import tracking_uri as resolve_uri

    client = MlflowClient(tracking_uri=resolve_uri(tracking_uri))
    if run_id is None:
        experiment = client.get_experiment_by_name("cxrtune/exports")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment("cxrtune/exports")
        run_id = client.create_run(experiment_id, run_name=f"export-{model_name}").info.run_id
        client.set_terminated(run_id)
    client.log_artifacts(run_id, str(export_folder), "export")
    try:
        client.get_registered_model(model_name)
    except Exception:
        client.create_registered_model(model_name)
    version = client.create_model_version(model_name, source=f"runs:/{run_id}/export", run_id=run_id)
    client.set_registered_model_alias(model_name, "best", version.version)
    return str(version.version)


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export the best trial of a sweep as a torchvision backbone")
    p.add_argument("--sweep", required=True, help="sweep name (its folder under --storage)")
    p.add_argument("--storage", default="./cxrtune-runs", help="folder holding the sweeps")
    p.add_argument("--metric", default="probe_auroc_20shot", help="metric that ranks the checkpoints")
    p.add_argument("--mode", default="max", choices=("max", "min"))
    p.add_argument("--out", default=None, help="output folder (default <sweep folder>/export)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="input channels of conv1")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export there (only a cxrtune export: never another folder)")
    p.add_argument("--include-audit", action="store_true",
                   help="let trials of the pruning audit (--audit-fraction: ASHA stopped them, the audit ran them "
                        "on) be selected too; by default the selection is ASHA's own")
    p.add_argument("--register", default=None, metavar="MODEL_NAME",
                   help="also register it in the MLflow model registry with the alias 'best'")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    folder = Path(args.storage).expanduser().resolve() / args.sweep
    out = export_best(folder, args.metric, args.mode, args.out, args.force, args.channels, args.include_audit)
    print(f"exported the best checkpoint by {args.metric} to {out}")
    if args.register:
        version = register_in_mlflow(out, args.register, args.tracking_uri)
        print(f"registered as {args.register} version {version} with alias 'best'")
    return 0
