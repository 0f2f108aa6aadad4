"""Every GPU measurement and check of cxrtune, in one call, written to a folder.

    python bench/gpu_suite.py OUT                     # on the GPU machine: study sizes, under 8 minutes
    python bench/gpu_suite.py OUT --tiny --device cpu # the same code at toy sizes (the test suite runs it)

Sections (``--sections``, all by default), each written to ``OUT/gpu_suite.json`` and
``OUT/gpu_suite.md`` as soon as it ends, so a run cut short keeps what it measured:

- ``throughput``: per method at the study's recipe (224 px; ResNet50, ResNet18 for BarlowTwins
  with the study's activation checkpointing), images/s, FLOPs per image (torch's FlopCounterMode
  over one full step, eager graph), model-FLOP utilisation against the card's dense bf16 peak,
  peak memory: eager NCHW, eager channels_last, compiled channels_last (compiled NCHW for MoCo
  too); and MoCo with activation checkpointing, for the memory it saves. Compiled rows run while
  the time budget allows, MoCo's first; a row skipped for time says so.
- ``pipeline``: the input pipeline's share of a real MoCo step: the same steps with the batch
  already on the device, gathered on the training thread from a memory-mapped cache (the plain
  path) and through the prefetcher; and ``bench/prefetch_overlap.py``'s synthetic comparison.
- ``precision``: 20 steps of every method from one seed in fp32 (TF32 off) and bf16 autocast on
  the same batches; the largest relative difference of the losses against a stated tolerance.
- ``syncs``: two training steps of every method under ``torch.cuda.set_sync_debug_mode("error")``
  (after a warm step): a step that makes the host wait for the GPU fails there, naming the op
  (CUDA only; the training loop itself reads the loss every ``train.loss_check_every`` steps).
- ``profile``: torch.profiler over five MoCo steps; the top kernels by device time in
  ``OUT/profile_moco.txt`` (and the JSON).
- ``sweep``: ``sweeps/moco_variance.py`` for two epochs, one trial on the phantom (224 px from a
  256 px cache, ``--gpu 1``), then ``cxrtune export`` of its best checkpoint, loaded back.

On the CPU with ``--tiny`` every section runs at toy sizes (ResNet18, 32 px, a few steps; compile
off unless ``--compile on``); its figures mean nothing, it only keeps the code from rotting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402
import prefetch_overlap  # noqa: E402

from cxrtune.augment import BatchAugment  # noqa: E402
from cxrtune.engine.prefetch import Prefetcher, fetch  # noqa: E402
from cxrtune.engine.train import build_optimizer, optimizer_step  # noqa: E402
from cxrtune.methods import Progress, method_names  # noqa: E402
from cxrtune.profiles import smoke, study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("throughput", "pipeline", "precision", "syncs", "profile", "sweep")
#: bf16 vs fp32: every one of the 20 losses within this relative difference
PRECISION_TOLERANCE = 0.02
#: MoCo v2 ResNet50 at 224 px, bf16: the MFU asked for, and the input pipeline's largest share
TARGET_MFU = 0.25
TARGET_INPUT_SHARE = 0.05


class Suite:
    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.started = time.monotonic()
        self.deadline = self.started + 60 * args.budget_minutes
        self.peak = gpu_throughput.peak_tflops(self.device, args.peak_tflops)
        self.report: dict = {"device": self._device_name(), "torch": torch.__version__,
                             "cuda": torch.version.cuda, "python": platform.python_version(), "tiny": self.tiny,
                             "peak_bf16_tflops": self.peak, "budget_minutes": args.budget_minutes,
                             "sections": {}}

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def config(self, method: str):
        return (smoke if self.tiny else study)(method)

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_suite.json")
        (self.out / "gpu_suite.md").write_text(markdown(self.report))

    def run(self, sections: list[str]) -> int:
        failed = 0
        for name in sections:
            began = time.monotonic()
            print(f"== {name} ({self.left():.0f} s of the budget left)", flush=True)
            try:
                result = getattr(self, name)()
                result["seconds"] = round(time.monotonic() - began, 1)
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others' figures
                failed += 1
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8),
                          "seconds": round(time.monotonic() - began, 1)}
                print(result["traceback"], file=sys.stderr, flush=True)
            self.report["sections"][name] = result
            self.write()
        return failed

    # -- sections ---------------------------------------------------------------------------------
    def throughput(self) -> dict:
        steps, warmup = (2, 1) if self.tiny else (self.args.steps, 3)
        cl = self.device.type == "cuda" or self.tiny
        compile_on = self.args.compile == "on" or (self.args.compile == "auto" and not self.tiny)
        methods = self.args.methods
        plan = [(m, False, False, None) for m in methods] + [(m, False, True, None) for m in methods]
        plan += [("moco", False, True, True)]
        if compile_on:
            plan += [("moco", True, True, None), ("moco", True, False, None)]
            plan += [(m, True, True, None) for m in methods if m != "moco"]
        rows, skipped = [], []
        for method, compiled, channels_last, ckpt in plan:
            if channels_last and not cl:
                continue
            # a compiled row needs about a minute on a GPU; an eager one a few seconds
            need = 90 if compiled and not self.tiny else 15
            if self.left() < need + self.reserve():
                skipped.append({"method": method, "compile": compiled, "channels_last": channels_last,
                                "why": f"time: {self.left():.0f} s of the budget left"})
                continue
            row = gpu_throughput.measure(method, self.device, self.tiny, None, compiled, channels_last, steps, warmup,
                                         self.peak, grad_checkpointing=ckpt)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return {"rows": rows, "skipped": skipped, "steps": steps, "warmup": warmup}

    def reserve(self) -> float:
        """Seconds kept for the sections after throughput (they are short; the sweep is not)."""
        return 0 if self.tiny else 240

    def pipeline(self) -> dict:
        method = "moco"
        config = self.config(method)
        size, batch = config.train.image_size, config.train.batch_size
        side = _cache_side(config)
        steps = 6 if self.tiny else 30
        count = batch * (3 if self.tiny else 8)
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            images = prefetch_overlap.make_cache(Path(tmp), count, side)
            rng = np.random.default_rng(0)
            orders = [rng.choice(count, batch, replace=False) for _ in range(steps + 2)]
            step = _training_step(method, config, self.device)
            resident = fetch(images, orders[0], self.device)
            timings = {}
            for name in ("resident", "plain", "prefetcher", "resident"):
                if name == "resident":
                    source = iter([resident] * len(orders))
                elif name == "plain":
                    source = (fetch(images, rows, self.device) for rows in orders)
                else:
                    source = iter(Prefetcher(images, orders, self.device, depth=2))
                step(next(source))
                step(next(source))
                _sync(self.device)
                began = time.perf_counter()
                for batch_ in source:
                    step(batch_)
                _sync(self.device)
                timings.setdefault(name, []).append((time.perf_counter() - began) / steps)
            del images
        resident_s = min(timings["resident"])
        result = {"method": method, "arch": config.model.arch, "size": size, "cache_side": side, "batch": batch,
                  "steps": steps, "step_ms_resident": round(1e3 * resident_s, 2)}
        for name in ("plain", "prefetcher"):
            wall = timings[name][0]
            result[f"step_ms_{name}"] = round(1e3 * wall, 2)
            result[f"input_share_{name}"] = round(max(0.0, wall - resident_s) / wall, 4)
        result["target_input_share"] = TARGET_INPUT_SHARE
        synthetic = ["--device", str(self.device)] + (["--tiny"] if self.tiny else ["--batches", "30", "--rounds", "3"])
        result["synthetic"] = prefetch_overlap.main(synthetic)
        return result

    def precision(self) -> dict:
        steps = 3 if self.tiny else 20
        rows = []
        for method in self.args.methods:
            config = self.config(method)
            losses = {}
            for mode in ("fp32", "bf16"):
                losses[mode] = _losses(method, config, self.device, steps, bf16=mode == "bf16",
                                       batch=8 if self.tiny else None)
            rel = [abs(b - a) / max(abs(a), 1e-6) for a, b in zip(losses["fp32"], losses["bf16"])]
            rows.append({"method": method, "steps": steps, "fp32": [round(v, 5) for v in losses["fp32"]],
                         "bf16": [round(v, 5) for v in losses["bf16"]], "max_rel_diff": round(max(rel), 5),
                         "first_rel_diff": round(rel[0], 5), "within_tolerance": max(rel) <= PRECISION_TOLERANCE})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("fp32", "bf16")}), flush=True)
        return {"tolerance": PRECISION_TOLERANCE, "rows": rows}

    def syncs(self) -> dict:
        if self.device.type != "cuda":
            return {"applicable": False, "why": "sync debug mode is CUDA's"}
        rows = []
        for method in self.args.methods:
            config = self.config(method)
            step = _training_step(method, config, self.device)
            side = _cache_side(config)
            images = torch.randint(0, 256, (config.train.batch_size, side, side), dtype=torch.uint8,
                                   device=self.device)
            step(images)
            torch.cuda.synchronize(self.device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(images)
                step(images)
                rows.append({"method": method, "host_syncs": "none"})
            except RuntimeError as exc:
                rows.append({"method": method, "host_syncs": str(exc).splitlines()[0][:300]})
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize(self.device)
            del step, images
            torch.cuda.empty_cache()
        return {"applicable": True, "rows": rows}

    def profile(self) -> dict:
        from torch.profiler import ProfilerActivity, profile

        config = self.config("moco")
        step = _training_step("moco", config, self.device)
        side = _cache_side(config)
        images = torch.randint(0, 256, (config.train.batch_size, side, side), dtype=torch.uint8, device=self.device)
        for _ in range(3):
            step(images)
        _sync(self.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(2 if self.tiny else 5):
                step(images)
            _sync(self.device)
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30)
        (self.out / "profile_moco.txt").write_text(table)
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1
        top = [{"name": e.key[:120], "self_ms": round(getattr(e, key) / 1e3, 3), "share": round(getattr(e, key) / total, 4),
                "calls": e.count} for e in events[:15]]
        return {"sorted_by": key, "top": top, "file": "profile_moco.txt"}

    def sweep(self) -> dict:
        storage = self.out / "sweeps"
        name = "gpu-smoke"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   CXRTUNE_CACHE=str(self.out / "cache"))
        ray_tmp = tempfile.mkdtemp(prefix="cxr-", dir="/tmp")  # short: Ray's socket paths must stay under ~107 bytes
        env["RAY_TMPDIR"] = ray_tmp
        command = [sys.executable, str(ROOT / "sweeps" / "moco_variance.py"), "--profile", "smoke",
                   "--name", name, "--storage", str(storage), "--tracking-uri", f"sqlite:///{self.out / 'mlflow.db'}",
                   "--num-samples", "1", "--no-report", "--set", "train.epochs=2", "--set", "train.checkpoint_every=1"]
        if self.tiny:
            command += ["--cache-size", "36"]  # 32 px views, as the profile's, from a cache an eighth larger
        else:
            command += ["--cache-size", "256", "--set", "train.image_size=224", "--set", "probe.input_size=224",
                        "--set", "model.arch=resnet50", "--set", "train.batch_size=32"]
        if self.device.type == "cuda":
            command += ["--gpu", "1"]
        began = time.monotonic()
        try:
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(60, self.left()))
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        sweep_s = time.monotonic() - began
        (self.out / "sweep.log").write_text(run.stdout + "\n--- stderr ---\n" + run.stderr)
        result = {"command": " ".join(command[1:]), "returncode": run.returncode, "sweep_s": round(sweep_s, 1),
                  "log": "sweep.log"}
        if run.returncode != 0:
            raise RuntimeError(f"the sweep exited {run.returncode}; see sweep.log: {run.stderr.strip()[-400:]}")
        export = self.out / "export"
        exported = subprocess.run([sys.executable, "-m", "cxrtune", "export", "--sweep", name, "--storage",
                                   str(storage), "--out", str(export), "--force"],
                                  env=env, capture_output=True, text=True, timeout=300)
        result["export_returncode"] = exported.returncode
        if exported.returncode != 0:
            raise RuntimeError(f"cxrtune export exited {exported.returncode}: {exported.stderr.strip()[-400:]}")
        from cxrtune.models.backbone import load_backbone

        backbone = load_backbone(export / "backbone.pt")
        metrics = json.loads((export / "metrics.json").read_text())
        selected = metrics["selected_report"]
        result.update(export=str(export.relative_to(self.out)), arch=backbone.arch,
                      selected_by=metrics["selected_by"], trial_images_per_s=round(selected["images_per_s"], 1),
                      files=sorted(p.name for p in export.iterdir() if not p.name.startswith(".")))
        return result


def _cache_side(config) -> int:
    """The cache side a config trains from: 256 for 224 px (the study's), else an eighth more."""
    size = config.train.image_size
    return 256 if size == 224 else size + size // 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _training_step(method: str, config, device: torch.device):
    """The training loop's step (bf16 autocast and channels_last on CUDA) as a function of a uint8 batch."""
    cuda = device.type == "cuda"
    model = gpu_throughput.build_model(method, config, device, channels_last=cuda)
    optimizer = build_optimizer(model, config)
    augment = BatchAugment(config.augment, config.train.image_size, torch.Generator(device=device).manual_seed(0))
    counter = [0]

    def step(batch: torch.Tensor) -> None:
        where = Progress(epoch=1, step=counter[0], steps_per_epoch=100, epochs=2)
        counter[0] += 1
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model.training_loss(batch, augment, where)["loss"]
        optimizer_step(model, optimizer, loss, where, config.optim.clip_grad_norm)

    return step


def _losses(method: str, config, device: torch.device, steps: int, bf16: bool, batch: int | None) -> list[float]:
    """The losses of ``steps`` training steps from seed 0 on seeded random batches."""
    cuda = device.type == "cuda"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        batch = batch or config.train.batch_size
        model = gpu_throughput.build_model(method, config, device, channels_last=cuda)
        optimizer = build_optimizer(model, config)
        augment = BatchAugment(config.augment, config.train.image_size, torch.Generator(device=device).manual_seed(0))
        side = _cache_side(config)
        data = torch.Generator().manual_seed(1)
        out = []
        for k in range(steps):
            images = torch.randint(0, 256, (batch, side, side), generator=data, dtype=torch.uint8).to(device)
            where = Progress(epoch=0, step=k, steps_per_epoch=100, epochs=2)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model.training_loss(images, augment, where)["loss"]
            out.append(float(loss.detach()))
            optimizer_step(model, optimizer, loss, where, config.optim.clip_grad_norm)
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def markdown(report: dict) -> str:
    lines = [f"# cxrtune GPU suite: {report['device']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, dense bf16 peak {report['peak_bf16_tflops']} TFLOP/s"
             f"{', TOY SIZES (--tiny): the figures mean nothing' if report['tiny'] else ''}; "
             f"{report.get('elapsed_s', 0):.0f} s in all.", ""]
    sections = report["sections"]
    for name, result in sections.items():
        lines += [f"## {name} ({result.get('seconds', 0):.0f} s)", ""]
        if "error" in result:
            lines += [f"**failed**: {result['error']}", ""]
            continue
        if name == "throughput":
            lines += ["| method | arch | batch | compile | channels_last | act. ckpt | images/s | GFLOP/image | "
                      "TFLOP/s | MFU | peak GiB | first step s |", "|---" * 12 + "|"]
            for r in result["rows"]:
                mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "n/a"
                lines.append(f"| {r['method']} | {r['arch']} | {r['batch']} | {'on' if r['compile'] else 'off'} | "
                             f"{'on' if r['channels_last'] else 'off'} | {'on' if r['grad_checkpointing'] else 'off'} | "
                             f"{r['images_per_s']} | {r['gflop_per_image']} | {r['achieved_tflops']} | {mfu} | "
                             f"{r.get('peak_memory_gb', 'n/a')} | {r['first_step_s']} |")
            for s in result["skipped"]:
                lines.append(f"| {s['method']} | | | {'on' if s['compile'] else 'off'} | "
                             f"{'on' if s['channels_last'] else 'off'} | | skipped: {s['why']} | | | | | |")
            moco = [r for r in result["rows"] if r["method"] == "moco" and "mfu" in r and not r["grad_checkpointing"]]
            if moco:
                best = max(moco, key=lambda r: r["mfu"])
                verdict = "met" if best["mfu"] >= TARGET_MFU else f"missed by {100 * (TARGET_MFU - best['mfu']):.1f} points"
                lines += ["", f"MoCo's best MFU {100 * best['mfu']:.1f} % against the target {100 * TARGET_MFU:.0f} %: "
                          f"{verdict}."]
        elif name == "pipeline":
            lines += [f"MoCo {result['arch']} at {result['size']} px from a {result['cache_side']} px memory-mapped "
                      f"cache, batch {result['batch']}, {result['steps']} steps:", "",
                      "| batches | ms per step | input share |", "|---|---|---|",
                      f"| already on the device | {result['step_ms_resident']} | - |",
                      f"| gathered on the training thread | {result['step_ms_plain']} | "
                      f"{100 * result['input_share_plain']:.1f} % |",
                      f"| prefetcher | {result['step_ms_prefetcher']} | {100 * result['input_share_prefetcher']:.1f} % |",
                      "", f"Target: input under {100 * TARGET_INPUT_SHARE:.0f} % of step time. Synthetic "
                      f"(bench/prefetch_overlap.py): plain/prefetcher {result['synthetic']['speedup']} "
                      f"(ideal {result['synthetic']['ideal_speedup']})."]
        elif name == "precision":
            lines += [f"{result['rows'][0]['steps'] if result['rows'] else 0} steps from one seed, fp32 (TF32 off) vs "
                      f"bf16 autocast; tolerance {100 * result['tolerance']:.0f} % relative on every loss.", "",
                      "| method | first loss fp32 | bf16 | first rel. diff | max rel. diff | within |", "|---" * 6 + "|"]
            for r in result["rows"]:
                lines.append(f"| {r['method']} | {r['fp32'][0]} | {r['bf16'][0]} | {r['first_rel_diff']} | "
                             f"{r['max_rel_diff']} | {'yes' if r['within_tolerance'] else 'NO'} |")
        elif name == "syncs":
            if not result["applicable"]:
                lines += [f"Not applicable: {result['why']}."]
            else:
                lines += ["| method | host syncs in a training step |", "|---|---|"]
                lines += [f"| {r['method']} | {r['host_syncs']} |" for r in result["rows"]]
        elif name == "profile":
            lines += [f"Top by {result['sorted_by']} (whole table: {result['file']}):", "",
                      "| kernel / op | self ms | share | calls |", "|---|---|---|---|"]
            for e in result["top"][:10]:
                lines.append(f"| `{e['name'][:70]}` | {e['self_ms']} | {100 * e['share']:.1f} % | {e['calls']} |")
        elif name == "sweep":
            chosen = result["selected_by"]
            lines += [f"`{result['command']}`: {result['sweep_s']} s, exit {result['returncode']}; the trial trained at "
                      f"{result['trial_images_per_s']} images/s; `cxrtune export` wrote a {result['arch']} to "
                      f"{result['export']} ({', '.join(result['files'])}), chosen by {chosen['metric']} = "
                      f"{chosen['value']:.3f}, and it loads."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_suite.json, gpu_suite.md, the profile and the sweep")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU (the test suite)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--methods", default=",".join(method_names()),
                        help="comma-separated (default: every registered method)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help="compiled throughput rows: auto = on a GPU only")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per throughput row")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="compiled rows are skipped past this")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the card's name)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections {','.join(unknown)}: not a section; use any of {', '.join(SECTIONS)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(method_names()))
    if unknown:
        parser.error(f"--methods {','.join(unknown)}: not a registered method; use any of {', '.join(method_names())}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu --tiny")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        torch.backends.cudnn.benchmark = True
    suite = Suite(args.out, args)
    failed = suite.run(sections)
    print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}; {failed} section(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
