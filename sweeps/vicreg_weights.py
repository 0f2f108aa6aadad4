"""VICReg: Optuna over the variance and covariance weights and the learning rate.

The invariance weight stays at the paper's 25, so the searched weights are relative to it: the
variance weight over 5-100 (0.2 to 4 times the invariance weight), the covariance weight over
0.1-10 (1/250 to 2/5 of it). The first point evaluated is the paper's 25/25/1 at the cpu preset's
AdamW lr 1e-3. The lr range is AdamW's: on the study or l4 profile (LARS at lr 0.2) fix it with
``--set optim.lr=0.2`` and only the weights are searched.
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from ray import tune

from cxrtune.sweep.cli import PretrainSweep, main

SWEEP = PretrainSweep(
    name="vicreg_weights",
    method="vicreg",
    space={
        "vicreg.variance_weight": tune.loguniform(5.0, 100.0),
        "vicreg.covariance_weight": tune.loguniform(0.1, 10.0),
        "optim.lr": tune.loguniform(2e-4, 1e-2),
    },
    seed_point={"vicreg.variance_weight": 25.0, "vicreg.covariance_weight": 1.0, "optim.lr": 1e-3},
    description=__doc__,
)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
