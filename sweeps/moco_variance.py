"""MoCo v2 with a variance term: Optuna over the variance weight, the temperature and the learning rate.

The study's setting (variance weight 1.0, temperature 0.07, lr 0.045) is the first point evaluated.
Each trial is judged by the mean linear-probe AUROC at 20 shots over the findings of the source.
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from ray import tune

from cxrtune.sweep.cli import PretrainSweep, main

SWEEP = PretrainSweep(
    name="moco_variance",
    method="moco",
    space={
        "moco.variance_weight": tune.uniform(0.0, 2.0),
        "moco.temperature": tune.loguniform(0.03, 0.3),
        "optim.lr": tune.loguniform(0.005, 0.2),
    },
    seed_point={"moco.variance_weight": 1.0, "moco.temperature": 0.07, "optim.lr": 0.045},
    description=__doc__,
)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
