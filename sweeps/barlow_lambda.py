"""BarlowTwins: Optuna over the off-diagonal weight lambda and the learning rate.

The study's setting (lambda 0.005, AdamW lr 2.4e-3, ResNet18) is the first point evaluated.
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from ray import tune

from cxrtune.sweep.cli import PretrainSweep, main

SWEEP = PretrainSweep(
    name="barlow_lambda",
    method="barlow",
    space={
        "barlow.lambda_offdiag": tune.loguniform(5e-4, 5e-2),
        "optim.lr": tune.loguniform(2e-4, 1e-2),
    },
    seed_point={"barlow.lambda_offdiag": 0.005, "optim.lr": 2.4e-3},
    description=__doc__,
)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
