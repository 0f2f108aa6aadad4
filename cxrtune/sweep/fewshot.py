"""Few-shot grids as sweeps: every (backbone x evaluator) is one small Tune trial.

Trials are small (a probe grid on cached features, or finetuning on a handful of images), so many
pack onto one GPU with fractional resources (``--gpu 0.25`` runs four at once); on a CPU-only
machine the same sweep runs on CPU fractions. All trials share one image cache and one episodes
file, so their tables pair up episode by episode; the driver merges them into the study's table
(mean AUROC by shots, paired t-test and Wilcoxon p-values against each baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from cxrtune.errors import CxrtuneError
from cxrtune.sweep.cli import positive_float, positive_int

#: Per profile: cache side, evaluation input size and crop, shot grid, trials, finetune budget.
FEWSHOT_PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"cache_size": 32, "input_size": 32, "crop_fraction": 1.0, "shots": (1, 5), "trials": 2,
              "finetune_epochs": 1, "phantom": {"n_pretrain": 0, "train_pos": 6, "val_pos": 4, "train_neg": 40,
                                                "val_neg": 30, "fewshot_studies": 1},
              "note": "a plumbing check on tiny images; its AUROCs mean nothing"},
    "default": {"cache_size": 64, "input_size": 64, "crop_fraction": 1.0, "shots": (1, 5, 10, 20, 50), "trials": 5,
                "finetune_epochs": 5, "phantom": {"n_pretrain": 0},
                "note": "the full shot grid at 64 px on CPU"},
    "cpu": {"cache_size": 64, "input_size": 64, "crop_fraction": 1.0, "shots": (1, 5, 10, 20, 50), "trials": 10,
            "finetune_epochs": 20, "phantom": {"n_pretrain": 0},
            "note": "the study's grid (10 trials) at 64 px"},
    "l4": {"cache_size": 256, "input_size": 224, "crop_fraction": 224 / 256, "shots": (1, 5, 10, 20, 50),
           "trials": 10, "finetune_epochs": 100, "phantom": {"n_pretrain": 0},
           "note": "the study's protocol at 224 px (finetuning 100 epochs)"},
}


@dataclasses.dataclass
class FewshotSweep:
    name: str
    evaluators: tuple[str, ...] = ("probe",)
    description: str = ""


def build_parser(sweep: FewshotSweep) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python sweeps/{sweep.name}.py", description=sweep.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Profiles:\n" + "\n".join(f"  {k:<8} {v['note']}" for k, v in FEWSHOT_PROFILES.items()))
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="a cxrtune checkpoint or exported backbone.pt to evaluate (repeatable)")
    parser.add_argument("--from-sweeps", default=None, metavar="NAMES",
                        help="comma-separated sweep names whose exported best backbones to evaluate")
    parser.add_argument("--baselines", default="random,imagenet",
                        help="comma-separated baselines of each checkpoint's architecture: random, imagenet")
    parser.add_argument("--imagenet-weights", action="append", default=[], metavar="ARCH=PATH",
                        help="local torchvision weights per architecture, e.g. resnet18=resnet18-f37072fd.pth")
    parser.add_argument("--evaluators", default=",".join(sweep.evaluators), help="probe, knn and/or finetune")
    # None defaults: --resume takes a left-out value from the sweep's record (see cxrtune.sweep.cli)
    parser.add_argument("--profile", default=None, choices=tuple(FEWSHOT_PROFILES), help="(default: default)")
    parser.add_argument("--source", default=None,
                        help="data source: phantom (embedded, the default), nih, padchest, csv")
    parser.add_argument("--root", default=None, help="folder of the source's files")
    parser.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="source option, repeatable")
    parser.add_argument("--name", default=None, help=f"sweep name (default: {sweep.name})")
    parser.add_argument("--storage", default="./cxrtune-runs", help="where sweeps live")
    parser.add_argument("--address", default=None, help="an existing Ray cluster ('auto' or host:port)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    parser.add_argument("--gpu", type=positive_float, default=None,
                        help="GPU share per trial, e.g. 0.25 packs four per GPU")
    parser.add_argument("--cpu", type=positive_float, default=1.0, help="CPU share per trial")
    parser.add_argument("--cpus", type=positive_int, default=None, help="CPUs Ray may use on this machine")
    parser.add_argument("--max-concurrent", type=positive_int, default=None,
                        help="trials at once (default: as resources allow)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own progress tables and logs here instead of in <sweep>/ray-console.log")
    return parser


def _imagenet_weights(pairs: list[str]) -> dict[str, str]:
    weights = {}
    for pair in pairs:
        if "=" not in pair:
            raise CxrtuneError(f"--imagenet-weights {pair!r} is not of the form ARCH=PATH")
        arch, path = pair.split("=", 1)
        if not Path(path).is_file():
            raise CxrtuneError(f"--imagenet-weights {arch}={path}: the file does not exist")
        weights[arch.strip()] = str(Path(path).resolve())
    return weights


def backbones_to_evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per backbone: {label, init, arch, weights}."""
    from cxrtune.models.backbone import CheckpointError, load_backbone, load_torchvision_weights, Backbone

    checkpoints = [Path(c).resolve() for c in args.checkpoint]
    for name in (args.from_sweeps or "").split(","):
        if name.strip():
            path = Path(args.storage).resolve() / name.strip() / "export" / "backbone.pt"
            source_ckpt = _export_source_checkpoint(path)
            if source_ckpt is None:
                raise CxrtuneError(f"sweep {name!r} has no export in {path.parent}: run it (it exports its best) "
                                   "or `cxrtune export --sweep NAME`")
            checkpoints.append(source_ckpt)
    entries = []
    archs = []
    for path in checkpoints:
        backbone = load_backbone(path)  # checks the file before any trial starts
        label = path.parent.parent.parent.name if path.name == "backbone.pt" and "checkpoint_" in path.parent.name \
            else path.stem
        entries.append({"label": label, "init": str(path), "arch": backbone.arch, "weights": None})
        archs.append(backbone.arch)
    archs = sorted(set(archs)) or ["resnet18"]
    weights = _imagenet_weights(args.imagenet_weights)
    for baseline in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        if baseline not in ("random", "imagenet"):
            raise CxrtuneError(f"--baselines names {baseline!r}: use random and/or imagenet")
        for arch in archs:
            if baseline == "imagenet":
                try:
                    load_torchvision_weights(Backbone(arch), weights.get(arch))
                except CheckpointError as err:
                    raise CxrtuneError(f"{err}. Pass --imagenet-weights {arch}=PATH, or leave imagenet out "
                                       "with --baselines random") from None
            entries.append({"label": f"{baseline}-{arch}", "init": baseline, "arch": arch,
                            "weights": weights.get(arch) if baseline == "imagenet" else None})
    if not entries:
        raise CxrtuneError("nothing to evaluate: give --checkpoint, --from-sweeps or --baselines")
    return entries


def _export_source_checkpoint(export_backbone: Path) -> Path | None:
    """The cxrtune checkpoint an export was made from (exports themselves are plain state_dicts)."""
    import json

    metrics = export_backbone.parent / "metrics.json"
    if not metrics.is_file():
        return None
    folder = Path(json.loads(metrics.read_text())["checkpoint"])
    path = folder / "backbone.pt"
    return path if path.is_file() else None


def main(sweep: FewshotSweep, argv: list[str] | None = None) -> int:
    args = build_parser(sweep).parse_args(argv)
    try:
        return run(sweep, args)
    except CxrtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(sweep: FewshotSweep, args: argparse.Namespace) -> int:
    from cxrtune.sweep.runner import open_sweep

    name = args.name if args.name is not None else sweep.name
    record = {"profile": args.profile, "source": args.source,
              "root": str(Path(args.root).expanduser().resolve()) if args.root else None,
              "options": sorted(args.option) if args.option else None}
    if not args.resume:
        record = {**record, "profile": "default" if args.profile is None else args.profile,
                  "source": "phantom" if args.source is None else args.source}
    with open_sweep(name, args.storage, resume=args.resume, tracking_uri=args.tracking_uri, record=record,
                    resume_hint=f"(sweep {name} in {args.storage})") as opened:
        args.profile = opened.record["profile"] if opened.record.get("profile") is not None else "default"
        args.source = opened.record["source"] if opened.record.get("source") is not None else "phantom"
        args.root, args.option = opened.record.get("root"), opened.record.get("options")
        return _run_open(sweep, args, opened)


def _run_open(sweep: FewshotSweep, args: argparse.Namespace, opened) -> int:
    from ray import tune

    from cxrtune.sweep.cli import prepare_data
    from cxrtune.sweep.runner import SweepSpec, run_sweep
    from trainables.fewshot import fewshot_trainable

    profile = FEWSHOT_PROFILES[args.profile]
    name = opened.name
    folder = opened.folder
    started = time.time()
    entries = backbones_to_evaluate(args)
    evaluators = [e.strip() for e in args.evaluators.split(",") if e.strip()]
    data_profile = {"phantom": profile["phantom"], "cache_size": profile["cache_size"], "shots": profile["shots"],
                    "trials": profile["trials"]}
    data = prepare_data(args, data_profile, folder)
    source, cache, episodes, episodes_path = data.eval_source, data.eval_cache, data.episodes, data.episodes_path
    print(f"sweep {name}: {len(entries)} backbones x {len(evaluators)} evaluators on {len(episodes)} episodes "
          f"({profile['note']})")
    grid = [{"backbone.init": e["init"], "backbone.arch": e["arch"], "backbone.weights": e["weights"],
             "label": e["label"], "eval.evaluators": [ev]} for e in entries for ev in evaluators]
    param_space = {
        "case": tune.grid_search(grid),
        "eval.input_size": profile["input_size"], "eval.crop_fraction": profile["crop_fraction"],
        "eval.finetune.epochs": profile["finetune_epochs"],
    }
    resources = {"cpu": args.cpu}
    if args.gpu:
        resources["gpu"] = args.gpu
    inputs = {"trial.cache": str(cache.path), "trial.episodes": str(episodes_path)}  # data, not params
    from cxrtune import sweepstate

    sweepstate.write_inputs(folder, inputs)
    spec = SweepSpec(name=name, trainable=tune.with_parameters(fewshot_trainable, inputs=inputs),
                     param_space=param_space, metric="mean_auroc",
                     mode="max", num_samples=1, max_concurrent=args.max_concurrent if args.max_concurrent is not None else len(grid),
                     resources=resources, search="grid", asha=False,
                     tags={"cxrtune.kind": "fewshot", "cxrtune.source": source.name}, console_keys=())
    results = run_sweep(spec, storage=args.storage, address=args.address, num_cpus=args.cpus,
                        verbose=1 if args.verbose else 0, opened=opened)
    table = collect_results(results)
    table.to_parquet(folder / "results.parquet", index=False)
    print(report(table, [e["label"] for e in entries if e["init"] in ("random", "imagenet")]))
    print(f"results: {folder / 'results.parquet'}; wall time {time.time() - started:.0f} s")
    return 0


def collect_results(results) -> pd.DataFrame:
    frames = []
    for result in results:
        if result.error is not None:
            continue
        path = Path(result.path) / "results.parquet"
        if path.is_file():
            frame = pd.read_parquet(path)
            frame["backbone"] = result.config["case"]["label"]
            frames.append(frame)
    if not frames:
        raise CxrtuneError("no trial of the few-shot sweep produced results")
    return pd.concat(frames, ignore_index=True)


def report(table: pd.DataFrame, baselines: list[str]) -> str:
    from cxrtune.evaluate.run import study_table

    parts = []
    for baseline in baselines:
        if baseline in set(table["backbone"]):
            parts.append(study_table(table, baseline=baseline))
    return "\n\n".join(parts) if parts else study_table(table)
