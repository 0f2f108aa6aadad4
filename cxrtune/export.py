"""Export the best trial of a sweep as a torchvision-compatible backbone.

Reads the sweep folder that Ray Tune wrote (no Ray import): each trial folder holds
``params.json``, ``result.json`` (one JSON result per line, naming the checkpoint it saved) and
``checkpoint_NNNNNN/backbone.pt`` (written by the trainables with
:func:`cxrtune.models.backbone.save_backbone`). The best checkpoint is the one whose reported
``metric`` is best over every trial and report.

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
  final one), ``MODEL_CARD.md``.

Nothing is overwritten without ``force``; files are written to a temporary folder and renamed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrtune.errors import CxrtuneError
from cxrtune.models.backbone import adapt_first_conv, load_backbone

BACKBONE_FILE = "backbone.pt"


@dataclass
class TrialReport:
    trial_id: str
    trial_dir: Path
    config: dict[str, Any]
    result: dict[str, Any]
    checkpoint: Path | None


def read_results(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    results = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
    return results


def trial_dirs(sweep_folder: Path) -> list[Path]:
    return sorted(p for p in sweep_folder.iterdir() if p.is_dir() and (p / "params.json").is_file())


def candidate_reports(sweep_folder: Path, metric: str) -> list[TrialReport]:
    """Every report that has ``metric`` and a checkpoint still on disk."""
    reports = []
    for trial_dir in trial_dirs(sweep_folder):
        config = json.loads((trial_dir / "params.json").read_text())
        for result in read_results(trial_dir):
            value = result.get(metric)
            name = result.get("checkpoint_dir_name")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not name:
                continue
            ckpt = trial_dir / name / BACKBONE_FILE
            if ckpt.is_file():
                reports.append(TrialReport(str(result.get("trial_id", trial_dir.name)), trial_dir, config,
                                           result, ckpt))
    return reports


def best_report(sweep_folder: str | Path, metric: str, mode: str = "max") -> TrialReport:
    sweep_folder = Path(sweep_folder)
    if not sweep_folder.is_dir():
        raise CxrtuneError(f"sweep folder {sweep_folder} does not exist; run the sweep first or pass --storage")
    if mode not in ("max", "min"):
        raise CxrtuneError(f"mode = {mode!r}: use max or min")
    reports = candidate_reports(sweep_folder, metric)
    if not reports:
        available = sorted({k for d in trial_dirs(sweep_folder) for r in read_results(d)[-1:] for k in r
                            if isinstance(r.get(k), (int, float))})
        raise CxrtuneError(
            f"no checkpoint in {sweep_folder} has a reported {metric!r}; "
            f"metrics reported there: {', '.join(available) or 'none'}"
        )
    pick = max if mode == "max" else min
    return pick(reports, key=lambda r: r.result[metric])


def torchvision_state_dict(checkpoint: Path, channels: int = 3) -> tuple[dict[str, torch.Tensor], str]:
    backbone = load_backbone(checkpoint)
    state = adapt_first_conv(backbone.torchvision_state_dict(), channels)
    return state, backbone.arch


def export_best(sweep_folder: str | Path, metric: str, mode: str = "max", out: str | Path | None = None,
                force: bool = False, channels: int = 3) -> Path:
    """Write the best checkpoint's backbone, config, metrics and model card; return the folder."""
    sweep_folder = Path(sweep_folder)
    out = Path(out) if out else sweep_folder / "export"
    if out.exists() and any(out.iterdir()) and not force:
        raise CxrtuneError(f"export folder {out} already exists; pass --force to overwrite it")
    if channels not in (1, 3):
        raise CxrtuneError(f"channels = {channels}: use 1 or 3")
    report = best_report(sweep_folder, metric, mode)
    state, arch = torchvision_state_dict(report.checkpoint, channels)
    final = read_results(report.trial_dir)[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        torch.save(state, tmp / BACKBONE_FILE)
        (tmp / "config.json").write_text(json.dumps(report.config, indent=2, sort_keys=True, default=str))
        metrics = {"selected_by": {"metric": metric, "mode": mode, "value": report.result[metric]},
                   "selected_report": _plain(report.result), "final_report": _plain(final),
                   "trial_id": report.trial_id, "checkpoint": str(report.checkpoint.parent)}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        (tmp / "MODEL_CARD.md").write_text(model_card(report, arch, metric, channels))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _plain(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "config"}


def model_card(report: TrialReport, arch: str, metric: str, channels: int) -> str:
    config = report.config
    method = config.get("method", "unknown")
    lines = [
        f"# cxrtune backbone: {method} {arch}",
        "",
        f"- trial: `{report.trial_id}`, checkpoint `{report.checkpoint.parent.name}` "
        f"(training iteration {report.result.get('training_iteration', '?')})",
        f"- selected by `{metric}` = {report.result[metric]:.4f}",
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
    lines += ["", "## Metrics at the selected checkpoint", "", "| metric | value |", "|---|---|"]
    for key, value in sorted(report.result.items()):
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
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    p.add_argument("--register", default=None, metavar="MODEL_NAME",
                   help="also register it in the MLflow model registry with the alias 'best'")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    folder = Path(args.storage).expanduser().resolve() / args.sweep
    out = export_best(folder, args.metric, args.mode, args.out, args.force, args.channels)
    print(f"exported the best checkpoint by {args.metric} to {out}")
    if args.register:
        version = register_in_mlflow(out, args.register, args.tracking_uri)
        print(f"registered as {args.register} version {version} with alias 'best'")
    return 0
