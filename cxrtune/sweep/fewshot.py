"""Few-shot grids as sweeps: every (backbone x evaluator) is one small Tune trial.

Trials are small (a probe grid on cached features, or finetuning on a handful of images), so many
pack onto one GPU with fractional resources. Before Ray starts, the driver measures one trial of
each evaluator in a short dry run and sizes the share per trial from its peak memory
(:mod:`cxrtune.sweep.packing`; ``--gpu 0.25`` overrides it and runs four at once); on a CPU-only
machine the same sweep is packed by memory and cores. Trials that evaluate the same backbone share
its features through the on-disk feature cache, so a grid of evaluators extracts each backbone
once. All trials share one image cache and one episodes file, so their tables pair up episode by
episode; the driver merges them into the study's table (mean AUROC by shots, paired t-test and
Wilcoxon p-values against each baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import pandas as pd

from cxrtune.errors import CxrtuneError
from cxrtune.profiles import get_profile, profile_notes
from cxrtune.sweep.args import (
    add_common_arguments,
    apply_record,
    parse_sets,
    positive_float,
    run_command,
    sweep_record,
    with_defaults,
)
from cxrtune.sweep.packing import add_packing_arguments
from cxrtune.sweepfolder import BACKBONE_FILE, RESULTS_TABLE, SweepFolder

#: what a few-shot sweep records (and a resume checks)
RECORDED = ("profile", "source", "root", "options", "set")
#: eval keys the driver reads to sample the episodes once: not a trial's to change
_DRIVER_KEYS = ("eval.shots", "eval.trials")

@dataclasses.dataclass
class FewshotSweep:
    name: str
    evaluators: tuple[str, ...] = ("probe",)
    description: str = ""


def build_parser(sweep: FewshotSweep) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python sweeps/{sweep.name}.py", description=sweep.description,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Profiles:\n" + profile_notes("fewshot"))
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="a cxrtune checkpoint or exported backbone.pt to evaluate (repeatable)")
    parser.add_argument("--from-sweeps", default=None, metavar="NAMES",
                        help="comma-separated sweep names whose exported best backbones to evaluate")
    parser.add_argument("--baselines", default="random,imagenet",
                        help="comma-separated baselines of each checkpoint's architecture: random, imagenet")
    parser.add_argument("--imagenet-weights", action="append", default=[], metavar="ARCH=PATH",
                        help="local torchvision weights per architecture, e.g. resnet18=resnet18-f37072fd.pth")
    parser.add_argument("--evaluators", default=",".join(sweep.evaluators), help="probe, knn and/or finetune")
    parser.add_argument("--cpu", type=positive_float, default=None,
                        help="CPU share per trial (default: packed by --pack auto; 1 with --pack off)")
    add_common_arguments(parser, sweep.name,
                         gpu_help="GPU share per trial, e.g. 0.25 for four per GPU (default: planned from a measured "
                                  "trial by --pack auto when this machine has a GPU); refused on a cluster without GPUs")
    add_packing_arguments(parser)
    return parser


def resolve(profile: str, sets: dict[str, Any]):
    """The evaluation config every trial of the grid shares (a :class:`cxrtune.resolve.Resolved`):
    EvalConfig's defaults, the profile's few-shot settings, then ``--set`` (``eval.*`` keys)."""
    from cxrtune.evaluate.run import EvalConfig
    from cxrtune.resolve import resolve_flat

    chosen = get_profile(profile)
    return resolve_flat(EvalConfig().to_flat(prefix="eval."),
                        [(f"profile {profile}: few-shot", chosen.fewshot), ("--set", sets)], "a few-shot sweep")


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
    from cxrtune.models.backbone import (
        Backbone,
        CheckpointError,
        load_backbone,
        load_torchvision_weights,
    )

    checkpoints = [Path(c).resolve() for c in args.checkpoint]
    for name in (args.from_sweeps or "").split(","):
        if name.strip():
            # the checkpoint the export was made from (exports themselves are plain state_dicts)
            folder = SweepFolder(Path(args.storage).resolve() / name.strip())
            source = folder.exported_checkpoint()
            if source is None or not (source / BACKBONE_FILE).is_file():
                raise CxrtuneError(f"sweep {name!r} has no export in {folder.export_dir}: run it (it exports its "
                                   "best) or `cxrtune export --sweep NAME`")
            checkpoints.append(source / BACKBONE_FILE)
    entries = []
    archs = []
    for path in checkpoints:
        backbone = load_backbone(path)  # checks the file before any trial starts
        label = path.parent.parent.parent.name if path.name == BACKBONE_FILE and "checkpoint_" in path.parent.name \
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


def main(sweep: FewshotSweep, argv: list[str] | None = None) -> int:
    return run_command(sweep, argv, build_parser, run)


def run(sweep: FewshotSweep, args: argparse.Namespace) -> int:
    from cxrtune.sweep.runner import open_sweep

    if args.print_config:
        resolved = resolve(args.profile or "default", parse_sets(args))
        evaluators = [e.strip() for e in args.evaluators.split(",") if e.strip()]
        print(resolved.table(f"sweep {sweep.name}, profile {args.profile or 'default'}",
                             {"eval.evaluators": (repr(evaluators), "grid: one trial per backbone x evaluator")}))
        return 0
    name = args.name if args.name is not None else sweep.name
    record = sweep_record(args, RECORDED)
    if not args.resume:
        record = with_defaults(record)
        resolve(record["profile"], parse_sets(args))  # a bad --set is refused before anything is written
    with open_sweep(name, args.storage, resume=args.resume, tracking_uri=args.tracking_uri, record=record,
                    resume_hint=f"(sweep {name} in {args.storage})") as opened:
        apply_record(args, opened.record)
        return _run_open(sweep, args, opened)


def _run_open(sweep: FewshotSweep, args: argparse.Namespace, opened) -> int:
    from ray import tune

    from cxrtune.sweep.data import EpisodePlan, prepare_data
    from cxrtune.sweep.packing import plan_packing, write_plan
    from cxrtune.sweep.runner import SweepSpec, run_sweep
    from cxrtune.sweep.summary import write_report
    from cxrtune.sweepfolder import PACKING_FILE
    from cxrtune.trainables.fewshot import fewshot_trainable

    profile = get_profile(args.profile)
    name = opened.name
    folder = opened.folder
    started = time.time()
    resolved = resolve(args.profile, parse_sets(args))
    entries = backbones_to_evaluate(args)
    evaluators = [e.strip() for e in args.evaluators.split(",") if e.strip()]
    plan = EpisodePlan(tuple(resolved.flat["eval.shots"]), int(resolved.flat["eval.trials"]))
    data = prepare_data(args, profile.cache_size, profile.fewshot_phantom, plan, folder)
    source, cache, episodes, episodes_path = data.eval_source, data.eval_cache, data.episodes, data.episodes_path
    print(f"sweep {name}: {len(entries)} backbones x {len(evaluators)} evaluators on {len(episodes)} episodes "
          f"({profile.fewshot_note})")
    grid = [{"backbone.init": e["init"], "backbone.arch": e["arch"], "backbone.weights": e["weights"],
             "label": e["label"], "eval.evaluators": [ev]} for e in entries for ev in evaluators]
    configured = {k: v for k, v in resolved.flat.items() if k not in _DRIVER_KEYS and k != "eval.evaluators"}
    param_space = {"case": tune.grid_search(grid), **configured}
    packing = plan_packing(args, resolved.flat, sorted({e["arch"] for e in entries}), evaluators, cache.path,
                           episodes_path)
    print(packing.line())
    write_plan(packing, folder / PACKING_FILE)
    inputs = {"trial.cache": str(cache.path), "trial.episodes": str(episodes_path)}  # data, not params
    from cxrtune import sweepstate

    sweepstate.write_inputs(folder, inputs)
    trainable = tune.with_parameters(fewshot_trainable, inputs=inputs, packing=packing.trial_info())
    spec = SweepSpec(name=name, trainable=trainable, param_space=param_space, metric="mean_auroc",
                     mode="max", num_samples=1,
                     max_concurrent=args.max_concurrent if args.max_concurrent is not None else len(grid),
                     resources=packing.resources, search="grid", asha=False, require_gpu=bool(args.gpu),
                     tags={"cxrtune.kind": "fewshot", "cxrtune.source": source.name,
                           "cxrtune.packing": packing.explanation},
                     params=packing.mlflow_params(), console_keys=())
    results = run_sweep(spec, storage=args.storage, address=args.address, num_cpus=args.cpus,
                        verbose=1 if args.verbose else 0, opened=opened)
    table = collect_results(results)
    table.to_parquet(folder / RESULTS_TABLE, index=False)
    print(report(table, [e["label"] for e in entries if e["init"] in ("random", "imagenet")]))
    if not args.no_report:
        write_report(name, args.storage, opened)
    print(f"results: {folder / RESULTS_TABLE}; wall time {time.time() - started:.0f} s")
    return 0


def collect_results(results) -> pd.DataFrame:
    frames = []
    for result in results:
        if result.error is not None:
            continue
        path = Path(result.path) / RESULTS_TABLE
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
