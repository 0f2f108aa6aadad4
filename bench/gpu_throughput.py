"""Training throughput and model-FLOP utilisation (MFU) per method on a GPU.

Study settings at 224 px with ResNet50, bf16 autocast and channels_last, each method with and
without ``torch.compile`` of the encoders. FLOPs per image come from ``torch.utils.flop_counter``
over one full training step (every forward and backward the method runs, EMA encoders included),
so MFU = FLOPs/image x images/s / peak bf16 FLOP/s. Augmentation on the device is inside the
timed step.

    python bench/gpu_throughput.py                       # CUDA, study sizes
    python bench/gpu_throughput.py --device cpu --tiny   # what CI runs: ResNet18, 32 px, batch 4

The peak is looked up from the device name (--peak-tflops overrides); on CPU MFU is reported
only when --peak-tflops is given.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cxrtune.augment import BatchAugment
from cxrtune.profiles import smoke, study
from cxrtune.engine.train import build_optimizer, optimizer_step
from cxrtune.methods import Progress, build_method, method_names
from cxrtune.models.backbone import Backbone, build_backbone

#: Dense bf16 peak TFLOP/s (vendor data sheets, no sparsity); the first name the device's name
#: contains wins, so the PCIe and NVL H100s come before the SXM one.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def build_model(method_name: str, config, device: torch.device, channels_last: bool):
    """The method of ``config`` from seed 0 on ``device``, as the training loop sets it up
    (activation checkpointing, channels_last backbones)."""
    torch.manual_seed(0)
    method = build_method(method_name, build_backbone(config.model.arch), config.method_config()).to(device)
    method.backbone.grad_checkpointing = config.train.grad_checkpointing
    if channels_last:
        method.to(memory_format=torch.channels_last)
        for module in method.modules():
            if isinstance(module, Backbone):
                module.channels_last = True
    return method


def make_step(method_name: str, device: torch.device, tiny: bool, batch: int | None, compile_: bool,
              channels_last: bool, grad_checkpointing: bool | None = None):
    config = (smoke if tiny else study)(method_name)
    if grad_checkpointing is not None:
        config = config.override({"train.grad_checkpointing": grad_checkpointing})
    size = config.train.image_size
    batch = batch or config.train.batch_size
    method = build_model(method_name, config, device, channels_last)
    optimizer = build_optimizer(method, config)
    if compile_:
        method.compile_encoders(lambda module: module.compile())
    augment = BatchAugment(config.augment, size, torch.Generator(device=device).manual_seed(0))
    cache_side = 256 if size == 224 else size + size // 8
    images = torch.randint(0, 256, (batch, cache_side, cache_side), dtype=torch.uint8, device=device)
    use_bf16 = device.type == "cuda"
    counter = {"step": 0}

    def step() -> None:
        where = Progress(epoch=1, step=counter["step"], steps_per_epoch=100, epochs=2)
        counter["step"] += 1
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = method.training_loss(images, augment, where)["loss"]
        optimizer_step(method, optimizer, loss, where)

    return step, batch, config


def measure(method_name: str, device: torch.device, tiny: bool, batch: int | None, compile_: bool,
            channels_last: bool, steps: int, warmup: int, peak: float | None,
            grad_checkpointing: bool | None = None) -> dict:
    """One row: images/s over ``steps`` timed steps after ``warmup`` (the first of which pays for
    compilation and cuDNN's autotuning: ``first_step_s``), FLOPs of one step, MFU, peak memory."""
    step, batch, config = make_step(method_name, device, tiny, batch, compile_, channels_last, grad_checkpointing)
    if compile_:  # count FLOPs on the eager graph: the counter does not see inside compiled code
        eager, _, _ = make_step(method_name, device, tiny, batch, False, channels_last, grad_checkpointing)
        with FlopCounterMode(display=False) as flops:
            eager()
        del eager
    else:
        with FlopCounterMode(display=False) as flops:
            step()
    flops_per_image = flops.get_total_flops() / batch
    first = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - first
    for _ in range(max(0, warmup - 1)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    images_per_s = steps * batch / seconds
    result = {"method": method_name, "arch": config.model.arch, "size": config.train.image_size, "batch": batch,
              "compile": compile_, "channels_last": channels_last,
              "grad_checkpointing": config.train.grad_checkpointing, "first_step_s": round(first_step_s, 2),
              "images_per_s": round(images_per_s, 1),
              "gflop_per_image": round(flops_per_image / 1e9, 2),
              "achieved_tflops": round(flops_per_image * images_per_s / 1e12, 2)}
    if peak:
        result["mfu"] = round(flops_per_image * images_per_s / (peak * 1e12), 4)
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke sizes (ResNet18, 32 px, batch 8): CI on CPU")
    parser.add_argument("--batch", type=int, default=None, help="override the study batch size")
    parser.add_argument("--methods", default=",".join(method_names()), help="comma-separated (default: every registered method)")
    parser.add_argument("--compile", default="off,on", help="off, on or off,on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    peak = peak_tflops(device, args.peak_tflops)
    channels_last = device.type == "cuda"
    rows = []
    for name in args.methods.split(","):
        for mode in args.compile.split(","):
            r = measure(name, device, args.tiny, args.batch, mode == "on", channels_last, args.steps, args.warmup, peak)
            rows.append(r)
            mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "n/a"
            print(f"{name:7s} compile {mode:3s}: {r['images_per_s']:9.1f} images/s  {r['gflop_per_image']:7.2f} GFLOP/image  "
                  f"{r['achieved_tflops']:7.2f} TFLOP/s  MFU {mfu}", flush=True)
    print(json.dumps({"device": str(device), "peak_tflops": peak, "results": rows}))


if __name__ == "__main__":
    main()
