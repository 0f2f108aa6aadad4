"""Phantom rendering speed: images/s on one core at 128 and 224 px, and the default build time.

Prints, in one run, images/s per core at each size (rows in index order, so each patient's warped
layers are reused across its studies), the cost split between per-patient and per-study work, and
optionally the wall time of building the default 128 px cache on 2 workers (``--build``).

    python bench/phantom_speed.py [--n 400] [--build]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cxrtune.data.phantom.anatomy import anatomy_pool  # noqa: E402
from cxrtune.data.phantom.builder import PhantomConfig, Renderer, plan_rows  # noqa: E402
from cxrtune.data.phantom.render import make_patient, render_study  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images rendered per size")
    ap.add_argument("--build", action="store_true", help="also time building the default 128 px cache")
    args = ap.parse_args()
    pool = anatomy_pool(None, None)
    rows = plan_rows(PhantomConfig(n_pretrain=args.n), n_anatomies=len(pool)).iloc[: args.n]
    print(f"{len(rows)} pretraining rows, {rows['patient_id'].nunique()} patients, 1 process")
    for size in (128, 224):
        r = Renderer(pool)
        r.render(next(rows.itertuples(index=False)), size)  # warm the per-size layer pyramid
        r = Renderer(pool)
        t0 = time.perf_counter()
        for row in rows.itertuples(index=False):
            r.render(row, size)
        dt = time.perf_counter() - t0
        base = pool[0]
        t1 = time.perf_counter()
        patients = [make_patient(base, size, s) for s in range(20)]
        t_patient = (time.perf_counter() - t1) / 20
        t2 = time.perf_counter()
        for s in range(40):
            render_study(patients[s % 20], s)
        t_study = (time.perf_counter() - t2) / 40
        print(f"{size:4d} px: {len(rows) / dt:7.1f} images/s/core   (per patient {t_patient * 1e3:.1f} ms, "
              f"per study {t_study * 1e3:.1f} ms)")
    if args.build:
        from cxrtune.data.cache import build_cache
        from cxrtune.data.sources import make_source

        with tempfile.TemporaryDirectory() as tmp:
            os.environ["CXRTUNE_CACHE"] = tmp
            # The CT's layers are reused from the user cache when present: copy is cheap to redo.
            t0 = time.perf_counter()
            src = make_source("phantom")
            index = src.build_index()
            t1 = time.perf_counter()
            cache = build_cache(src, size=128, workers=2, index=index, progress=False)
            t2 = time.perf_counter()
            again = build_cache(make_source("phantom"), size=128, workers=2, progress=False)
            t3 = time.perf_counter()
            print(f"default build: {len(cache)} images at 128 px; index {t1 - t0:.1f} s, images + masks "
                  f"{t2 - t1:.1f} s, total {t2 - t0:.1f} s on 2 workers; reuse {t3 - t2:.2f} s "
                  f"(same cache: {again.path == cache.path})")


if __name__ == "__main__":
    main()
