"""Training-step throughput per method on the CPU: images/s of a full step (augmentation,
forward, backward, optimiser, EMA/queue updates), ResNet18 at 128 px by default.

    python bench/train_step.py [--size 128] [--batch 32] [--steps 5] [--threads 2] [--methods moco,barlow]

Every method runs in the same process, one after the other, with the study's recipe at the given
size; the output is one line per method and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cxrtune.augment import BatchAugment
from cxrtune.profiles import cpu
from cxrtune.engine.train import build_optimizer, optimizer_step
from cxrtune.methods import Progress, build_method, method_names
from cxrtune.models.backbone import build_backbone


def step_throughput(method_name: str, size: int, batch: int, steps: int, arch: str) -> float:
    config = cpu(method_name).override({"train.image_size": size, "train.batch_size": batch, "model.arch": arch,
                                        "dino.local_crop_size": max(16, size // 2)})
    torch.manual_seed(0)
    method = build_method(method_name, build_backbone(arch), config.method_config())
    optimizer = build_optimizer(method, config)
    augment = BatchAugment(config.augment, size, torch.Generator().manual_seed(0))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8))

    def one(step: int) -> None:
        where = Progress(epoch=1, step=step, steps_per_epoch=steps, epochs=2)
        optimizer_step(method, optimizer, method.training_loss(images, augment, where)["loss"], where)

    one(0)  # warm-up
    start = time.perf_counter()
    for step in range(steps):
        one(step + 1)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--methods", default=",".join(method_names()), help="comma-separated (default: every registered method)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.methods.split(","):
        results[name] = round(step_throughput(name, args.size, args.batch, args.steps, args.arch), 1)
        print(f"{name:7s} {results[name]:8.1f} images/s  ({args.arch}, {args.size} px, batch {args.batch}, "
              f"{args.threads} threads, cpu profile heads)", flush=True)
    print(json.dumps({"size": args.size, "batch": args.batch, "threads": args.threads, "arch": args.arch,
                      "images_per_s": results}))


if __name__ == "__main__":
    main()
