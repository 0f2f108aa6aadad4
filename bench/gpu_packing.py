"""Many cheap trials on one device, measured: the few-shot grid at 1, 2, 4 and 8 trials per device.

Runs ``sweeps/fewshot_grid.py`` (its ``SWEEP``, in this process: one Ray session for every run)
on the phantom at 224 px (cache 256 px, the ``l4`` profile's protocol with one finetuning epoch)
over the same grid each time: three random-init resnet50 checkpoints and random init x probe and
finetune x shots 1, 5, 20 (2 trials each, 4 findings): 8 trials. Each level packs k trials per
device (``--gpu 1/k --pack off``; on a CPU ``--cpu cores/k``) and reports wall time, aggregate
episodes/s (evaluated episodes, i.e. rows of the results table, per second of the sweep),
speed-up over one trial per device, the trials' peak memory (each trial reports its own: the
CUDA allocator's reserved peak, or the RSS on a CPU), the feature extractions made (one per
backbone when its trials shared it) and errored trials. Each level starts with an empty feature
cache, so levels compare fairly. Before the levels a dry run measures one trial of each kind
(:func:`cxrtune.packing.measure_in_child`) and prints the plan ``--pack auto`` would choose.

On a GPU, before the levels, one deliberately over-cap sweep: a resnet18 and a resnet50
checkpoint, one evaluator, and a GPU share between what the dry run measured for the two, so the
resnet50 trial must end ``errored`` with the message naming its share, the measured peak and
``--gpu`` while the resnet18 trial finishes. On a CPU: "not applicable: memory caps are CUDA-only".

k=1 runs first (the baseline), then 8, 4, 2; a level that the ``--budget-s`` (default 330 s from
the start) would not hold is skipped and listed. Writes ``OUTDIR/packing.json`` and ``OUTDIR/packing.md``.

    python bench/gpu_packing.py bench-runs/gpu_packing                  # on the GPU machine, < 6 min
    python bench/gpu_packing.py /tmp/pk --tiny --device cpu              # the CPU check, about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: phantom few-shot subset of the full run: 4 findings, 25 training / 10 held-out positives each, 300
#: images (28 s to render at 256 px on 2 busy cores)
FULL_PHANTOM = {"n_pretrain": 0, "train_pos": 25, "val_pos": 10, "train_neg": 100, "val_neg": 60,
                "fewshot_studies": 1, "findings": ["calcified granuloma", "hiatal hernia", "pulmonary mass",
                                                   "fibrotic band"]}
#: the tiny run's: 2 findings, 90 images
TINY_PHANTOM = {"n_pretrain": 0, "train_pos": 6, "val_pos": 4, "train_neg": 40, "val_neg": 30, "fewshot_studies": 1,
                "findings": ["pulmonary mass", "hiatal hernia"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", help="folder for the caches, sweeps, MLflow store and the report")
    ap.add_argument("--tiny", action="store_true",
                    help="64 px, 2 findings, one random-init resnet18 checkpoint, probe and kNN only, k in {1, 2}: "
                         "the CPU check of this script")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cuda packs GPU shares (--gpu 1/k); cpu packs cores (--cpu cores/k); auto: cuda if present")
    ap.add_argument("--levels", default=None, help="trials per device to run, e.g. 1,2,4,8 (default: 1,2,4,8; "
                                                   "tiny: 1,2)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                    help="backbone checkpoints to evaluate (default: two random-init ones made here)")
    ap.add_argument("--evaluators", default=None, help="default: probe,finetune (tiny: probe,knn)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="a level that would end past this many seconds from the start is skipped (k=1 always "
                         "runs; level k is guessed to take max(0.2, 1.5 / k) of its time)")
    return ap.parse_args(argv)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available here: use --device cpu")
    return name


def _sweep():
    """The SWEEP that sweeps/fewshot_grid.py declares."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "sweeps"))
    spec = importlib.util.spec_from_file_location("fewshot_grid_script", ROOT / "sweeps" / "fewshot_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


def make_checkpoints(folder: Path, archs: list[str]) -> list[str]:
    """Random-init backbones of ``archs`` saved as cxrtune checkpoints (the weights do not change
    the cost of a trial)."""
    from cxrtune.models.backbone import build_backbone, save_backbone

    paths = []
    for i, arch in enumerate(archs):
        path = folder / f"ckpt{i}-{arch}.pt"
        if not path.is_file():
            save_backbone(build_backbone(arch, seed=100 + i), path)
        paths.append(str(path))
    return paths


def build_cache(phantom: dict, size: int):
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source

    return get_cache(make_source("phantom", None, **phantom), size=size)


def _options(phantom: dict) -> list[str]:
    out = []
    for key, value in phantom.items():
        out += ["-o", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return out


#: marks the cache folder this script made under OUTDIR: only such a folder's features are removed
CACHE_MARKER = ".cxrtune-gpu-packing-cache"


def own_cache(outdir: Path) -> Path:
    """``OUTDIR/cache``, made and marked by this script; a folder of that name it did not make is
    refused (the levels empty its feature cache, which must never be somebody else's)."""
    cache = outdir / "cache"
    if cache.exists() and not (cache / CACHE_MARKER).is_file() and any(cache.iterdir()):
        raise SystemExit(f"{cache} exists and was not made by bench/gpu_packing.py: give another OUTDIR")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / CACHE_MARKER).touch()
    return cache


def run_level(sweep, name: str, common: list[str], share: list[str], outdir: Path) -> dict:
    """One sweep of the grid; its wall time, evaluated episodes, trials' outcomes and peaks."""
    from cxrtune.sweep.fewshot import main
    from cxrtune.sweep.runner import sweep_dir

    cache = outdir / "cache"
    features = cache / "features"
    if (cache / CACHE_MARKER).is_file():  # this script's own cache (own_cache): every level extracts afresh
        shutil.rmtree(features, ignore_errors=True)
    storage = outdir / "runs"
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = main(sweep, [*common, "--name", name, "--storage", str(storage), *share])
    wall = time.perf_counter() - started
    folder = sweep_dir(name, storage)
    (outdir / f"{name}.log").write_text(printed.getvalue())
    trials = []
    for trial_dir in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "params.json").is_file()):
        params = json.loads((trial_dir / "params.json").read_text())
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()
                   if line.strip()] if (trial_dir / "result.json").is_file() else []
        error = (trial_dir / "error.txt").read_text() if (trial_dir / "error.txt").is_file() else ""
        last = results[-1] if results else {}
        trials.append({"trial": trial_dir.name, "backbone": params["case"]["label"],
                       "evaluator": params["case"]["eval.evaluators"][0],
                       "status": "completed" if results and not error else "errored",
                       "peak_gpu_reserved_gib": _gib(last.get("peak_gpu_reserved_bytes")),
                       "peak_rss_gib": _gib(last.get("peak_rss_bytes")),
                       "error": _cap_line(error)})
    episodes = 0
    if (folder / "results.parquet").is_file():
        import pandas as pd

        episodes = len(pd.read_parquet(folder / "results.parquet"))
    packing_line = next((line for line in printed.getvalue().splitlines() if line.startswith("packing: ")), "")
    # one entry per backbone when the trials of a backbone shared its extraction
    extracted = len(list(features.glob("*.npy"))) if features.is_dir() else 0
    return {"name": name, "exit_code": code, "wall_s": round(wall, 2), "episodes": episodes,
            "feature_extractions": extracted,
            "episodes_per_s": round(episodes / wall, 3) if wall > 0 else None, "packing": packing_line,
            "trials": trials}


def _gib(value) -> float | None:
    return round(value / 1024 ** 3, 4) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _cap_line(error: str) -> str:
    """The line of a trial's error.txt that says why it failed (the cap message when it is one)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    for line in lines:
        if "ran out of GPU memory under its cap" in line:
            return line[line.find("this trial"):] if "this trial" in line else line
    return lines[-1] if lines else ""


def over_cap(sweep, common: list[str], outdir: Path, measured, checkpoints: list[str]) -> dict:
    """A resnet18 and a resnet50 checkpoint, one evaluator (the kind whose measured peak differs
    most between the two), and a GPU share between the two peaks: two trials, the resnet50 one
    over its cap."""
    from cxrtune.packing import CUDA_CONTEXT_BYTES, round_share

    small_of, large_of = measured.by_arch["resnet18"], measured.by_arch["resnet50"]
    kind = max(small_of, key=lambda k: large_of[k] / small_of[k])
    small, large = small_of[kind], large_of[kind]
    if large < 1.5 * small:
        return {"outcome": f"not constructed: resnet50's measured {kind} peak ({_gib(large)} GiB) is not clearly "
                           f"above resnet18's ({_gib(small)} GiB)"}
    # the share's cap (share x total) lies between what resnet18 takes with room and what resnet50 needs
    share = round_share(math.sqrt(1.3 * small * large) / measured.total_bytes)
    args = [*common, "--evaluators", kind,
            "--checkpoint", checkpoints[0], "--checkpoint", checkpoints[1], "--baselines", "", "--gpu", f"{share}"]
    result = run_level(sweep, "packing_overcap", args, [], outdir)
    errored = [t for t in result["trials"] if t["status"] == "errored"]
    completed = [t for t in result["trials"] if t["status"] == "completed"]
    return {"kind": kind, "share": share, "cap_gib": _gib(share * measured.total_bytes),
            "resnet18_peak_gib": _gib(small),
            "resnet50_peak_gib": _gib(large), "cuda_context_gib": _gib(CUDA_CONTEXT_BYTES),
            "errored": [(t["backbone"], t["evaluator"], t["error"]) for t in errored],
            "completed": [(t["backbone"], t["evaluator"]) for t in completed],
            "outcome": (f"{len(errored)} over-cap trial(s) errored, {len(completed)} finished"
                        + (f": {errored[0]['error']}" if errored else "")),
            "wall_s": result["wall_s"]}


def warm_up(outdir: Path) -> None:
    """Start Ray and create the MLflow store before any level is timed: the first level would
    otherwise pay for both."""
    import mlflow

    from cxrtune.sweep.ray_session import ensure_ray

    ensure_ray(None, None, log_to_driver=False)
    mlflow.tracking.MlflowClient(f"sqlite:///{outdir / 'mlflow.db'}").search_experiments()


def write_report(report: dict, outdir: Path) -> None:
    (outdir / "packing.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# Few-shot trials packed on one {report['device']}", "",
             (f"{report['device_name']}; {report['grid']}; image cache built in {report['cache_build_s']} s "
              f"({report['images']} images at {report['cache_size']} px, input {report['input_size']} px)."), "",
             f"Dry run (one trial of each kind, {report['measurement']['seconds']} s): peak "
             + ", ".join(f"{k} {v} GiB" for k, v in report["measurement"]["peaks_gib"].items())
             + f" of {report['measurement']['total_gib']} GiB. {report['measurement']['plan']}", "",
             ("| trials per device | share | wall s | episodes | episodes/s | speed-up | peak per trial GiB | "
             "feature extractions | errored |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for level in report["levels"]:
        lines.append(f"| {level['k']} | {level['share']} | {level['wall_s']} | {level['episodes']} | "
                     f"{level['episodes_per_s']} | {level['speedup']} | {level['peak_per_trial_gib']} | "
                     f"{level['feature_extractions']} | {level['errored']} |")
    if report["skipped_levels"]:
        lines += ["", f"Skipped for the time budget: k = {report['skipped_levels']}"]
    lines += ["", f"Over-cap trial: {report['over_cap']['outcome']}", f"Total {report['total_s']} s.", ""]
    (outdir / "packing.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    os.environ["CXRTUNE_CACHE"] = str(own_cache(outdir))
    device = _device(args.device)
    import torch

    from cxrtune.packing import (
        available_cores,
        measure_from_files,
        measure_in_child,
        plan_cpu,
        plan_gpu,
    )

    levels = [int(k) for k in (args.levels or ("1,2" if args.tiny else "1,2,4,8")).split(",")]
    evaluators = args.evaluators or ("probe,knn" if args.tiny else "probe,finetune")
    phantom, cache_size, profile = (TINY_PHANTOM, 64, "default") if args.tiny else (FULL_PHANTOM, 256, "l4")
    sets = (["eval.shots=[1,5]", "eval.trials=2"] if args.tiny
            else ["eval.shots=[1,5,20]", "eval.trials=2", "eval.finetune.epochs=1"])
    started = time.perf_counter()
    cache = build_cache(phantom, cache_size)
    cache_build_s = round(time.perf_counter() - started, 1)
    # the grid: tiny, one resnet18 checkpoint (its probe and kNN trials share one extraction); else
    # three resnet50 checkpoints and random init, 8 trials with probe and finetune
    checkpoints = args.checkpoint or make_checkpoints(outdir / "checkpoints",
                                                      ["resnet18"] if args.tiny else ["resnet50"] * 3)
    common = ["--profile", profile, "--no-report", "--tracking-uri", f"sqlite:///{outdir / 'mlflow.db'}",
              *_options(phantom), *[a for s in sets for a in ("--set", s)]]
    grid = [*common, "--evaluators", evaluators, *[a for c in checkpoints for a in ("--checkpoint", c)],
            "--baselines", "" if args.tiny else "random"]
    sweep = _sweep()
    warm_up(outdir)

    from cxrtune.data.tasks import sample_episodes, save_episodes
    from cxrtune.models.backbone import load_backbone
    from cxrtune.sweep.fewshot import resolve

    resolved = resolve(profile, {k: json.loads(v) if v.startswith("[") else v
                                 for k, v in (s.split("=", 1) for s in sets)})
    episodes_probe = outdir / "measure-episodes.parquet"
    save_episodes(sample_episodes(_task_pool(phantom, cache), shots=tuple(resolved.flat["eval.shots"]),
                                  trials=int(resolved.flat["eval.trials"])), episodes_probe)
    cores = available_cores()
    archs = sorted({load_backbone(c).arch for c in checkpoints} | ({"resnet18", "resnet50"} if device == "cuda"
                                                                    else set()))
    measure = measure_in_child if device == "cuda" else measure_from_files  # no CUDA context in this process
    measured = measure([e for e in evaluators.split(",") if e], archs, str(cache.path), str(episodes_probe),
                       resolved.flat, device)
    grid_peaks = {k: max(measured.by_arch[load_backbone(c).arch][k] for c in checkpoints) for k in measured.peaks}
    plan = (plan_gpu(grid_peaks, measured.total_bytes, cores=cores) if device == "cuda"
            else plan_cpu(grid_peaks, measured.total_bytes, cores=cores))
    print(f"cache: {len(cache)} images at {cache_size} px in {cache_build_s} s; {plan.line()}", flush=True)

    if device == "cuda":  # first: it must be in the report whatever the budget leaves of the levels
        over = over_cap(sweep, common, outdir, measured, make_checkpoints(outdir / "overcap", ["resnet18", "resnet50"]))
        print(f"over-cap: {over['outcome']}", flush=True)
    else:
        over = {"outcome": "not applicable: memory caps are CUDA-only"}

    report_levels, skipped = [], []
    for k in sorted(levels, key=lambda k: (k != 1, -k)):  # k=1 first (the baseline), then the most packed
        base = next((level["wall_s"] for level in report_levels if level["k"] == 1), None)
        elapsed = time.perf_counter() - started
        if k != 1 and base is not None and elapsed + base * max(0.2, 1.5 / k) > args.budget_s:
            skipped.append(k)
            print(f"k={k}: skipped, {elapsed:.0f} s of the {args.budget_s:.0f} s budget spent", flush=True)
            continue
        share = (["--gpu", f"{1 / k:.4f}", "--cpu", f"{max(1, cores // k)}"] if device == "cuda"
                 else ["--cpu", f"{cores / k:g}" if cores >= k else f"{cores / k:.4f}"])
        result = run_level(sweep, f"packing_k{k}", grid, [*share, "--pack", "off"], outdir)
        peaks = [t["peak_gpu_reserved_gib"] if device == "cuda" else t["peak_rss_gib"] for t in result["trials"]]
        peaks = [p for p in peaks if p is not None]
        result.update(k=k, share=" ".join(share), errored=sum(t["status"] == "errored" for t in result["trials"]),
                      peak_per_trial_gib=max(peaks) if peaks else None)
        report_levels.append(result)
        print(f"k={k}: {result['wall_s']} s, {result['episodes']} episodes, {result['episodes_per_s']} episodes/s, "
              f"{result['errored']} errored", flush=True)
    report_levels.sort(key=lambda level: level["k"])
    base = next((level["wall_s"] for level in report_levels if level["k"] == 1), None)
    for level in report_levels:
        level["speedup"] = round(base / level["wall_s"], 2) if base and level["wall_s"] else None
    report = {"device": "GPU" if device == "cuda" else "CPU",
              "device_name": (torch.cuda.get_device_name(0) if device == "cuda" else f"{cores} CPU cores"),
              "grid": f"{len(checkpoints) + (0 if args.tiny else 1)} backbones x {evaluators} x shots "
                      f"{resolved.flat['eval.shots']}, {resolved.flat['eval.trials']} trials each",
              "cache_build_s": cache_build_s, "images": len(cache), "cache_size": cache_size,
              "input_size": resolved.flat["eval.input_size"],
              "measurement": {"peaks_gib": {k: _gib(v) for k, v in grid_peaks.items()},
                              "by_arch_gib": {a: {k: _gib(v) for k, v in p.items()} for a, p in measured.by_arch.items()},
                              "total_gib": _gib(measured.total_bytes), "seconds": round(measured.seconds, 1),
                              "plan": plan.line()},
              "levels": report_levels, "skipped_levels": skipped, "over_cap": over,
              "total_s": round(time.perf_counter() - started, 1)}
    write_report(report, outdir)
    print((outdir / "packing.md").read_text())
    return 0


def _task_pool(phantom: dict, cache):
    from cxrtune.data.sources.base import make_source

    return make_source("phantom", None, **phantom).task_pool(cache.index)


if __name__ == "__main__":
    raise SystemExit(main())
