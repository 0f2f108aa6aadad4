"""Why the random-init ResNet18 floor of the phantom sits at chance: a measured diagnosis.

bench/phantom_calibration.py measures the floor (a logistic probe at 50 shots on raw 32 px pixels
and on random-init ResNet18 features); on version 5 it found raw pixels at 0.557 but random
features at 0.517 (version 6, with the findings' clinical correlates: 0.588 and 0.554).
This benchmark asks whether that gap is a property of the images (a per-study nuisance that
random convolutional features respond to more than to the findings) or of how the random
features are computed. It renders the same few-shot pool several times, each time with one
per-study nuisance switched off, and probes each rendering the way the calibration does:

* image variants (``StudyParams.draw`` wrapped so that it draws exactly as before, consuming the
  same random numbers, then overrides the nuisance's fields: every other pixel effect, pose and
  noise field included, stays identical, so the variants are paired):
  ``baseline``, ``no-marker``, ``no-collimation``, ``no-grid-sharpen``, ``fixed-exposure``
  (window and gamma at the middle of their ranges), ``low-noise`` (quantum noise at its floor),
  ``no-pose`` (no rotation, scale, shift or parallax), ``all-off`` (all of them); and two
  data-side probes that are not per-study nuisances: ``mid-anatomy`` (every patient's
  ``PatientParams`` at mid-range: between-patient anatomy reduced to the elastic warp, vessels
  and lung-marking pattern; ``half-anatomy``: each parameter halfway to mid-range;
  ``mid-geometry`` / ``mid-density``: only the sizes and positions, or only the densities and
  textures, at mid-range (``half-density``: the densities halfway); ``half-soft-tissue`` / ``mid-soft-tissue``: soft-tissue thickness alone),
  ``severity-floor`` (every finding's severity lifted to 0.3 + 0.7 s: no faint cases) and the
  findings' clinical correlates (version 6, ``render.CORRELATES``) at 0, 0.5 or 2 times their
  size (``no-correlates``, ``half-correlates``, ``double-correlates``; ``baseline`` has them at 1);
* feature variants on the baseline images: ``r18`` as the calibration computes it (eval mode,
  untouched BatchNorm, features used as they come), ``r18-centred`` (the pool's mean feature
  subtracted before the probe's L2 normalisation, as the calibration already does for raw
  pixels), ``r18-bn-recal`` (BatchNorm running statistics recomputed from a train-mode pass over
  a few hundred pool images, then eval), ``r18-std-input`` (per-image standardised input, as the
  ceiling CNN uses), ``r18-map`` (the last stage's 4 x 4 map flattened instead of globally
  average-pooled), ``r18-eval-crop`` (the evaluation's 224/256 centre crop, which cuts most
  collimation edges, resized back to 128 px), and ``raw32-uncentred`` (the raw-pixel probe
  without its centring); the ``-c`` / ``-centred`` forms subtract the pool's mean feature first.

It also reports, for the baseline images, the share of each feature set's variance that the
study's nuisance parameters and the finding explain linearly (least squares, R^2 adjusted for
the number of parameters), and the mean cosine between two images' feature vectors (how much of
each vector is common to all images, which the probe's L2 normalisation leaves in place).

    python bench/phantom_floor_diagnosis.py [--trials 10] [--out bench-runs/phantom_floor_diagnosis.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import phantom_calibration as calib  # noqa: E402
from cxrtune.data.phantom import render as phantom_render  # noqa: E402
from cxrtune.data.phantom.builder import PhantomConfig, plan_rows  # noqa: E402
from cxrtune.data.phantom.findings import FINDINGS, NORMAL  # noqa: E402
from cxrtune.data.phantom.render import PatientParams, StudyParams, with_correlates  # noqa: E402

#: Field overrides of ``StudyParams`` that switch one nuisance off (mid-range values for the
#: exposure, so the images keep their usual grey levels).
NUISANCE_OFF: dict[str, dict] = {
    "no-marker": {"marker": 0},
    "no-collimation": {"collimation": (0.0, 0.0, 0.0, 0.0)},
    "no-grid-sharpen": {"grid_amp": 0.0, "sharpen": 0.0},
    "fixed-exposure": {"window_lo": 1.35, "window_hi": 5.6, "gamma": 1.01},
    "low-noise": {"noise": 0.0},
    "no-pose": {"rotation_deg": 0.0, "scale": 1.0, "shift_x": 0.0, "shift_y": 0.0, "parallax": 0.0},
}
#: Patient parameters at the middle of their ranges (no breast shadow): with ``mid-anatomy`` every
#: synthetic patient gets the same habitus, organ sizes, densities and lung markings' strength (the
#: elastic warp, vessel tree and marking pattern stay random); ``half-anatomy`` halves each
#: parameter's distance to these values. Probes of how much between-patient anatomy hides.
MID_ANATOMY = {
    "habitus_x": 0.985, "habitus_y": 0.99, "soft_tissue": 1.05, "lung_width_right": 1.0,
    "lung_width_left": 1.0, "lung_height": 1.15, "heart_width": 1.065, "rib_spacing": 1.0, "rib_angle": 0.0,
    "bone_density": 1.05, "lung_density": 0.985, "vessel_density": 1.1, "breast": 0.0, "shift_x": 0.0,
    "shift_y": 0.0, "parenchyma": 2.0, "parenchyma_px": float(np.sqrt(0.7 * 2.8)),
}
#: Severity floor of the ``severity-floor`` variant: s -> floor + (1 - floor) s, so that no finding
#: is among the faintest (the phantom draws most cases subtle, from Beta(1, 1.3)).
SEVERITY_FLOOR = 0.3
#: How far each patient parameter stays from its mid-range value (1 = as drawn).
ANATOMY_SPREAD = {"mid-anatomy": 0.0, "half-anatomy": 0.5, "half-soft-tissue": 0.5, "mid-soft-tissue": 0.0,
                  "mid-geometry": 0.0, "mid-density": 0.0, "half-density": 0.5}
#: Geometry (sizes, shapes, positions) and densities (attenuation, texture strength) of the anatomy.
GEOMETRY = ("habitus_x", "habitus_y", "lung_width_right", "lung_width_left", "lung_height", "heart_width",
            "rib_spacing", "rib_angle", "shift_x", "shift_y")
DENSITY = ("soft_tissue", "bone_density", "lung_density", "vessel_density", "breast", "parenchyma", "parenchyma_px")
#: The parameters a spread variant moves (all of MID_ANATOMY unless named here): soft-tissue
#: thickness alone explains 37 % of random features' variance, so it is probed on its own; the
#: geometry and density groups each at mid-range, the other group as drawn.
ANATOMY_KEYS = {"half-soft-tissue": ("soft_tissue",), "mid-soft-tissue": ("soft_tissue",),
                "mid-geometry": GEOMETRY, "mid-density": DENSITY, "half-density": DENSITY}
#: Multiplier of the findings' clinical correlates (``render.CORRELATES``) in the correlate variants
#: (1 in every other variant, as the phantom renders; 0 renders as phantom version 5 did, apart
#: from version 6's stronger callus).
CORRELATE_VARIANTS = {"no-correlates": 0.0, "half-correlates": 0.5, "double-correlates": 2.0}
IMAGE_VARIANTS = ("baseline", *NUISANCE_OFF, "all-off", *ANATOMY_SPREAD, "severity-floor", *CORRELATE_VARIANTS)
_ORIGINAL_DRAW = StudyParams.draw.__func__
_ORIGINAL_PATIENT_DRAW = PatientParams.draw.__func__


def overrides_of(variant: str) -> tuple[dict, float]:
    """(StudyParams fields that ``variant`` overrides, spread of the patient parameters about
    their mid-range values)."""
    if variant in ("baseline", "severity-floor", *CORRELATE_VARIANTS):
        return {}, 1.0
    if variant == "all-off":
        return {k: v for fields in NUISANCE_OFF.values() for k, v in fields.items()}, 1.0
    if variant in ANATOMY_SPREAD:
        return {}, ANATOMY_SPREAD[variant]
    if variant not in NUISANCE_OFF:
        raise SystemExit(f"variant {variant!r} is unknown: use one of {', '.join(IMAGE_VARIANTS)}")
    return dict(NUISANCE_OFF[variant]), 1.0


def variant_rows(rows: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The rows to render: ``severity-floor`` lifts every finding's severity."""
    if variant != "severity-floor":
        return rows
    rows = rows.copy()
    sick = rows["finding"] != NORMAL
    rows.loc[sick, "severity"] = SEVERITY_FLOOR + (1.0 - SEVERITY_FLOOR) * rows.loc[sick, "severity"]
    return rows


def patch_study_draw(variant: str) -> None:
    """Make ``StudyParams.draw`` (and ``PatientParams.draw``) return the usual draw with
    ``variant``'s fields overridden.

    The original draw runs first, so the generator is left in the same state and everything drawn
    from it afterwards (noise field, vessels, finding placement) is the same in every variant.
    Runs in the benchmark process and as the initialiser of each rendering worker.
    """
    study_fields, spread = overrides_of(variant)

    def draw(cls, rng: np.random.Generator) -> StudyParams:
        return dataclasses.replace(_ORIGINAL_DRAW(cls, rng), **study_fields)

    def draw_patient(cls, rng: np.random.Generator) -> PatientParams:
        p = _ORIGINAL_PATIENT_DRAW(cls, rng)
        if spread == 1.0:
            return p
        keys = ANATOMY_KEYS.get(variant, tuple(MID_ANATOMY))
        return dataclasses.replace(p, **{k: mid + spread * (getattr(p, k) - mid) for k, mid in MID_ANATOMY.items()
                                         if k in keys})

    phantom_render.CORRELATE_SCALE = CORRELATE_VARIANTS.get(variant, 1.0)
    phantom_render.StudyParams.draw = classmethod(draw)
    phantom_render.PatientParams.draw = classmethod(draw_patient)


def render_variant(rows: pd.DataFrame, variant: str, workers: int) -> np.ndarray:
    """The calibration's rendering (same chunks, same function) with ``variant`` patched in."""
    rows = variant_rows(rows, variant)
    patch_study_draw(variant)
    try:
        if workers <= 1:
            return calib._render_chunk((rows, calib.SIZE))
        return calib.render(rows, calib.SIZE, workers, initializer=patch_study_draw, initargs=(variant,))
    finally:
        patch_study_draw("baseline")


def to_input(imgs: np.ndarray, standardise: bool, crop: float = 1.0) -> torch.Tensor:
    x = torch.from_numpy(imgs).float().div(255).unsqueeze(1)
    if crop < 1.0:  # the evaluation's centre crop (224/256 of the side), resized back
        from cxrtune.evaluate.preprocess import crop_box

        off, side = crop_box(x.shape[-1], crop)
        x = torch.nn.functional.interpolate(x[..., off:off + side, off:off + side], size=x.shape[-1],
                                            mode="bilinear", align_corners=False, antialias=True)
    if standardise:  # as the ceiling CNN: grey level and contrast of each image removed
        return (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1e-3)
    return (x - calib.XRAY_MEAN) / calib.XRAY_STD


def r18_features(net: torch.nn.Module, imgs: np.ndarray, standardise: bool = False,
                 spatial: bool = False, crop: float = 1.0) -> np.ndarray:
    """Globally pooled features (512), or with ``spatial`` the last stage's 4 x 4 map flattened
    (8192): where in the image a response is, which global average pooling throws away."""
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs), 128):
            x = to_input(imgs[i:i + 128], standardise, crop)
            out.append((net.feature_map(x).flatten(1) if spatial else net(x)).numpy())
    return np.concatenate(out)


def recalibrated(net: torch.nn.Module, imgs: np.ndarray, n: int, seed: int) -> torch.nn.Module:
    """A copy of ``net`` whose BatchNorm running statistics are the average batch statistics of
    ``n`` pool images (a train-mode pass without gradients), left in eval mode."""
    import copy

    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass's batches
    pick = np.random.default_rng(seed).choice(len(imgs), size=min(n, len(imgs)), replace=False)
    net.train()
    with torch.no_grad():
        for i in range(0, len(pick), 128):
            net(to_input(imgs[np.sort(pick[i:i + 128])], False))
    return net.eval()


def centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0)


def mean_cosine(x: np.ndarray) -> float:
    """Mean cosine between two different rows: near 1 when a common direction dominates."""
    u = calib.l2(x.astype(np.float64))
    s = u.sum(axis=0)
    n = len(u)
    return float((s @ s - n) / (n * (n - 1)))


def nuisance_table(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each row's nuisance parameters (as the renderer draws them) grouped by cause, plus the
    finding (one-hot) and the patient's own anatomy parameters."""
    study = [StudyParams.draw(np.random.default_rng([int(s), 2])) for s in rows["study_seed"]]
    patient = {int(r.patient_seed): with_correlates(PatientParams.draw(np.random.default_rng([int(r.patient_seed), 1])),
                                                    r.finding, r.severity)
               for r in rows.drop_duplicates("patient_seed").itertuples(index=False)}
    col = np.array([s.collimation for s in study])
    groups = {
        "marker": np.array([[s.marker == 1, s.marker == 2, (s.marker > 0) * s.marker_pos[0],
                             (s.marker > 0) * s.marker_pos[1]] for s in study], float),
        "collimation": np.column_stack([col, (col > 0).any(axis=1)]),
        "exposure": np.array([[s.window_lo, s.window_hi, s.gamma] for s in study]),
        "grid-sharpen": np.array([[s.grid_amp, s.grid_amp > 0, s.sharpen, s.sharpen * s.sharpen_px] for s in study], float),
        "noise": np.array([[s.noise, s.noise_grain, s.blur_px] for s in study]),
        "pose": np.array([[s.rotation_deg, s.scale, s.shift_x, s.shift_y, s.parallax, s.bone_boost] for s in study]),
        "patient-anatomy": np.array([list(dataclasses.astuple(patient[int(p)])) for p in rows["patient_seed"]], float),
        "finding": pd.get_dummies(rows["finding"]).drop(columns=NORMAL).to_numpy(float),
    }
    groups["finding x severity"] = groups["finding"] * rows["severity"].to_numpy()[:, None]
    for j, field in enumerate(dataclasses.fields(PatientParams)):  # one anatomy parameter at a time
        groups[f"patient.{field.name}"] = groups["patient-anatomy"][:, j:j + 1]
    return groups


def explained_share(x: np.ndarray, z: np.ndarray) -> float:
    """Share of the (centred) variance of ``x`` explained by a least-squares fit on ``z``,
    adjusted for the number of predictors (so that a group of k unrelated columns scores ~0
    rather than ~k / n)."""
    xc = centred(x.astype(np.float64))
    zc = np.column_stack([centred(z.astype(np.float64)), np.ones(len(z))])
    coef, *_ = np.linalg.lstsq(zc, xc, rcond=None)
    r2 = 1.0 - ((xc - zc @ coef) ** 2).sum() / (xc ** 2).sum()
    n, k = len(z), np.linalg.matrix_rank(zc) - 1
    return float(1.0 - (1.0 - r2) * (n - 1) / max(n - k - 1, 1))


def probe(features: np.ndarray, rows: pd.DataFrame, episodes: pd.DataFrame) -> pd.DataFrame:
    from cxrtune.evaluate.probe import ProbeConfig, fit_probes

    local = {iid: k for k, iid in enumerate(rows["image_id"])}
    return fit_probes(features, episodes, local, ProbeConfig())[["disease", "trial", "auroc"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--shots", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-pos", type=int, default=60)
    ap.add_argument("--val-pos", type=int, default=60)
    ap.add_argument("--train-neg", type=int, default=600)
    ap.add_argument("--val-neg", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2, help="rendering processes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bn-images", type=int, default=512, help="pool images for the BatchNorm recalibration")
    ap.add_argument("--variants", default=",".join(IMAGE_VARIANTS))
    ap.add_argument("--out", default="bench-runs/phantom_floor_diagnosis.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 200)
    from cxrtune.data.tasks import build_task_pool, sample_episodes
    from cxrtune.models.backbone import Backbone

    t_start = time.perf_counter()
    cfg = PhantomConfig(n_pretrain=0, seed=args.seed, train_pos=args.train_pos, val_pos=args.val_pos,
                        train_neg=args.train_neg, val_neg=args.val_neg)
    rows = plan_rows(cfg).reset_index(drop=True)
    pool = build_task_pool(rows, exclude=(NORMAL,), min_train=1, min_val=1, max_train_neg=None, max_val_neg=None)
    episodes = sample_episodes(pool, shots=(args.shots,), trials=args.trials)
    torch.manual_seed(args.seed)
    net = Backbone("resnet18", in_chans=1).eval()  # one random network for every variant
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        overrides_of(v)
    print(f"pool: {len(rows)} images ({args.train_pos}/{args.val_pos} positives per finding, "
          f"{args.train_neg}/{args.val_neg} normals), {args.shots} shots x {args.trials} trials, {calib.SIZE} px")

    results: list[pd.DataFrame] = []
    extra: dict = {}

    def record(variant: str, features: str, x: np.ndarray) -> None:
        t = time.perf_counter()
        table = probe(x, rows, episodes).assign(variant=variant, features=features)
        results.append(table)
        print(f"  {variant:16s} {features:16s} mean AUROC {table['auroc'].mean():.3f} "
              f"(probe {time.perf_counter() - t:.0f} s)", flush=True)

    for variant in variants:
        t = time.perf_counter()
        imgs = render_variant(rows, variant, args.workers)
        t_render = time.perf_counter() - t
        t = time.perf_counter()
        r18 = r18_features(net, imgs)
        print(f"{variant}: rendered in {t_render:.0f} s, features in {time.perf_counter() - t:.0f} s", flush=True)
        record(variant, "raw32", calib.raw32(imgs))
        record(variant, "r18", r18)
        record(variant, "r18-centred", centred(r18))
        if variant != "baseline":
            continue
        # Feature-side variants and the variance decomposition, on the baseline images.
        record(variant, "raw32-uncentred", calib.raw32(imgs, centre=False))
        recal = r18_features(recalibrated(net, imgs, args.bn_images, args.seed), imgs)
        record(variant, "r18-bn-recal", recal)
        record(variant, "r18-bn-recal-c", centred(recal))
        std_in = r18_features(net, imgs, standardise=True)
        record(variant, "r18-std-input", std_in)
        record(variant, "r18-std-input-c", centred(std_in))
        spatial = r18_features(net, imgs, spatial=True)
        record(variant, "r18-map", spatial)
        record(variant, "r18-map-c", centred(spatial))
        cropped = r18_features(net, imgs, crop=224 / 256)
        record(variant, "r18-eval-crop", cropped)
        groups = nuisance_table(rows)
        feats = {"raw32": calib.raw32(imgs), "r18": r18, "r18-bn-recal": recal, "r18-std-input": std_in, "r18-map": spatial}
        extra["mean_cosine"] = {"raw32": mean_cosine(calib.raw32(imgs, centre=False)), "raw32-centred": mean_cosine(calib.raw32(imgs)),
                                "r18": mean_cosine(r18), "r18-centred": mean_cosine(centred(r18)),
                                "r18-bn-recal": mean_cosine(recal), "r18-std-input": mean_cosine(std_in),
                                "r18-map": mean_cosine(spatial)}
        # Shares of the variance of the L2-normalised features (what the probe sees, before its
        # intercept): the common direction is removed by the centring inside explained_share.
        extra["variance_explained"] = {
            name: {g: explained_share(calib.l2(x), z) for g, z in groups.items()} for name, x in feats.items()}

    res = pd.concat(results, ignore_index=True)
    mean = res.groupby(["variant", "features"], sort=False)["auroc"].mean().unstack("features")
    mean = mean.reindex(index=variants)
    # Standard error of the variant-minus-baseline difference over findings (paired by finding).
    per_finding = res.groupby(["variant", "features", "disease"], sort=False)["auroc"].mean()
    print(f"\nMean AUROC over the {len(FINDINGS)} findings at {args.shots} shots ({args.trials} trials):")
    print(mean.round(3).to_string(na_rep=""))
    if "baseline" in variants and len(variants) > 1:
        base = per_finding.xs("baseline", level="variant")
        diffs = {}
        for v in variants:
            if v == "baseline":
                continue
            d = (per_finding.xs(v, level="variant") - base.reindex(per_finding.xs(v, level="variant").index)).dropna()
            g = d.groupby(level="features")
            diffs[v] = {f: {"mean": float(s.mean()), "se": float(s.std(ddof=1) / np.sqrt(len(s)))} for f, s in g}
        print("\nChange against baseline (mean over findings, +- standard error over findings):")
        print(pd.DataFrame({v: {f: f"{x['mean']:+.3f} +- {x['se']:.3f}" for f, x in d.items()} for v, d in diffs.items()})
              .T.reindex(columns=["raw32", "r18", "r18-centred"]).to_string())
        extra["change_vs_baseline"] = diffs
    print("\nPer finding (mean over trials):")
    wide = per_finding.unstack(["variant", "features"])
    wide.columns = [f"{v}:{f}" for v, f in wide.columns]
    print(wide.reindex(list(FINDINGS)).round(3).T.to_string())
    if "mean_cosine" in extra:
        print("\nMean cosine between two images' features (baseline):")
        print(pd.Series(extra["mean_cosine"]).round(4).to_string())
        print("\nShare of the L2-normalised features' variance explained linearly (baseline, adjusted R^2):")
        print(pd.DataFrame(extra["variance_explained"]).round(3).to_string())
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.0f} s")
    out = {
        "config": {**vars(args), "size": calib.SIZE, "n_images": len(rows), "nuisance_off": NUISANCE_OFF,
                   "mid_anatomy": MID_ANATOMY, "severity_floor": SEVERITY_FLOOR},
        "mean_auroc": {v: {f: (None if pd.isna(x) else float(x)) for f, x in r.items()} for v, r in mean.iterrows()},
        "per_finding": [{"variant": v, "features": f, "finding": d, "auroc": float(a)} for (v, f, d), a in per_finding.items()],
        "episodes": res.to_dict(orient="records"),
        **extra,
        "seconds": elapsed,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
