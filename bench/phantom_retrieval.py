"""View retrieval on the phantom: does between-patient variety survive an SSL augmentation?

For 256 pretraining images (seeded draw, mostly distinct patients), each image's augmented view
is compared by cosine similarity (features centred on the gallery mean) with the 256 originals;
a hit is when its nearest original is its own source. Measured on raw 64 px pixels and on
random-init ResNet18 features (64 px input), over several augmentation draws. Instance
discrimination (MoCo, BarlowTwins) can only learn where this rate is well above chance (1/256).

Augmentation, per image: by default (``--recipe cpu``) the engine's own ``BatchAugment`` with
the MoCo ``cpu`` profile's recipe, the one its pretraining uses (crop scale 0.8-1 at aspect
0.9-1.11, no flip, rotation +-10 degrees, brightness and contrast +-0.4 with p 0.8, blur, Gaussian
noise 0.1), at the profile's 64 px; originals are normalised the same way. ``--recipe mild`` is
the earlier recipe of this benchmark (crop 0.5-1, horizontal flip p 0.5, rotation +-10 degrees, brightness
and contrast +-0.2, no blur or noise); ``--ablate`` takes that recipe apart.

    python bench/phantom_retrieval.py [--repeats 3] [--recipe cpu|mild]
    python bench/phantom_retrieval.py --variant half-density   # a floor-diagnosis data variant
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cxrtune.data.phantom.anatomy import anatomy_pool  # noqa: E402
from cxrtune.data.phantom.builder import PhantomConfig, Renderer, plan_rows  # noqa: E402

XRAY_MEAN, XRAY_STD = 0.4776, 0.2674


def augment(x: torch.Tensor, gen: torch.Generator, scale=(0.5, 1.0), degrees=10.0, jitter=0.2) -> torch.Tensor:
    """Per-image random resized crop + flip + rotation + brightness/contrast, as one affine grid
    per image (``x``: B x 1 x S x S in [0, 1])."""
    b, _, s, _ = x.shape
    area = torch.empty(b).uniform_(*scale, generator=gen)
    log_r = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    th = torch.deg2rad(torch.empty(b).uniform_(-degrees, degrees, generator=gen))
    cos, sin = torch.cos(th), torch.sin(th)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * cos * flip
    theta[:, 0, 1] = -h * sin
    theta[:, 1, 0] = w * sin * flip
    theta[:, 1, 1] = h * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    bright = torch.empty(b, 1, 1, 1).uniform_(1 - jitter, 1 + jitter, generator=gen)
    contrast = torch.empty(b, 1, 1, 1).uniform_(1 - jitter, 1 + jitter, generator=gen)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean) * bright
    return out.clamp(0, 1)


def retrieval_rate(gallery: torch.Tensor, queries: torch.Tensor) -> float:
    centre = gallery.mean(dim=0, keepdim=True)
    g = F.normalize(gallery - centre, dim=1)
    q = F.normalize(queries - centre, dim=1)
    nearest = (q @ g.T).argmax(dim=1)
    return float((nearest == torch.arange(len(g))).float().mean())


def render_gallery(n: int, size: int, seed: int) -> np.ndarray:
    pool = anatomy_pool(None, None)
    rows = plan_rows(PhantomConfig(n_pretrain=max(8 * n, 2000), seed=seed), n_anatomies=len(pool))
    rows = rows[rows["subset"] == "pretrain"]
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    r = Renderer(pool)
    return np.stack([r.render(row, size) for row in rows.iloc[pick].itertuples(index=False)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", choices=("cpu", "mild"), default="cpu",
                    help="cpu: the engine's MoCo cpu-profile augmentation (BatchAugment); mild: this bench's own")
    ap.add_argument("--ablate", action="store_true", help="also measure each part of the mild recipe on its own")
    ap.add_argument("--variant", default="baseline",
                    help="render with a data variant of bench/phantom_floor_diagnosis.py (e.g. mid-density, "
                         "half-density): the same draws with some patient parameters moved to mid-range")
    args = ap.parse_args(argv)
    recipe = None
    if args.recipe == "cpu":  # checked before anything is rendered
        from cxrtune.profiles import cpu

        profile = cpu("moco")
        recipe, size = profile.augment, profile.train.image_size
        if size != args.size:
            raise SystemExit(f"--size {args.size}: the cpu profile trains at {size} px; "
                             f"use --size {size} or --recipe mild")
    torch.set_num_threads(2)
    if args.variant != "baseline":
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from phantom_floor_diagnosis import patch_study_draw

        patch_study_draw(args.variant)
        print(f"variant {args.variant}")
    t0 = time.perf_counter()
    imgs = render_gallery(args.n, args.size, args.seed)
    x = torch.from_numpy(imgs).float().div(255).unsqueeze(1)
    print(f"rendered {len(x)} images at {args.size} px in {time.perf_counter() - t0:.1f} s")
    from cxrtune.models.backbone import Backbone

    torch.manual_seed(args.seed)
    net = Backbone("resnet18", in_chans=1).eval()

    def encode(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(t)

    def feats(t: torch.Tensor) -> torch.Tensor:  # [0, 1] images, normalised here
        return encode((t - XRAY_MEAN) / XRAY_STD)

    raw_pix, g_feat = x.flatten(1), feats(x)
    pix, feat = [], []
    if recipe is not None:  # BatchAugment's views come normalised: compare with normalised originals
        from cxrtune.augment import BatchAugment

        g_pix = ((x - XRAY_MEAN) / XRAY_STD).flatten(1)
        u8 = torch.from_numpy(imgs).unsqueeze(1)
        for k in range(args.repeats):
            v = BatchAugment(recipe, args.size, torch.Generator().manual_seed(1000 + k))(u8)
            pix.append(retrieval_rate(g_pix, v.flatten(1)))
            feat.append(retrieval_rate(g_feat, encode(v)))
    else:
        for k in range(args.repeats):
            v = augment(x, torch.Generator().manual_seed(1000 + k))
            pix.append(retrieval_rate(raw_pix, v.flatten(1)))
            feat.append(retrieval_rate(g_feat, feats(v)))
    print(f"view retrieval among {args.n} (chance {1 / args.n:.3%}), {args.repeats} augmentation draws, "
          f"{args.recipe} recipe:")
    print(f"  raw {args.size} px pixels:           {np.mean(pix):.1%}  (per draw {', '.join(f'{p:.1%}' for p in pix)})")
    print(f"  random-init ResNet18 features: {np.mean(feat):.1%}  (per draw {', '.join(f'{p:.1%}' for p in feat)})")
    if args.ablate:
        print("ablation of the mild recipe (one draw each; the flip p 0.5 is always on): pixels / features")
        parts = {
            "flip only": dict(scale=(1.0, 1.0), degrees=0.0, jitter=0.0),
            "flip + crop": dict(scale=(0.5, 1.0), degrees=0.0, jitter=0.0),
            "flip + rotation": dict(scale=(1.0, 1.0), degrees=10.0, jitter=0.0),
            "flip + jitter": dict(scale=(1.0, 1.0), degrees=0.0, jitter=0.2),
            "all": {},
        }
        for name, kw in parts.items():
            v = augment(x, torch.Generator().manual_seed(2000), **kw)
            print(f"  {name:16s} {retrieval_rate(raw_pix, v.flatten(1)):6.1%} / {retrieval_rate(g_feat, feats(v)):6.1%}")


if __name__ == "__main__":
    main()
