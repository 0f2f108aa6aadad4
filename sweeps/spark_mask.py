"""SparK (input-level masking): Optuna over the mask ratio and the learning rate.

The study's setting (mask ratio 0.6, AdamW lr 3e-4) is the first point evaluated.
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from ray import tune

from cxrtune.sweep.cli import PretrainSweep, main

SWEEP = PretrainSweep(
    name="spark_mask",
    method="spark",
    space={
        "spark.mask_ratio": tune.uniform(0.3, 0.85),
        "optim.lr": tune.loguniform(5e-5, 3e-3),
    },
    seed_point={"spark.mask_ratio": 0.6, "optim.lr": 3e-4},
    description=__doc__,
)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
