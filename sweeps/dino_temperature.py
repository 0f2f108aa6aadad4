"""DINO: Optuna over the teacher and student temperatures and the centre momentum.

The study's DINO flatlined (loss stuck at 5.42) with teacher temperature 0.07 -> 0.04, centre
momentum 0.99; the reference recipe (teacher 0.04, centre momentum 0.9) is the first point here.
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from ray import tune

from cxrtune.sweep.cli import PretrainSweep, main

SWEEP = PretrainSweep(
    name="dino_temperature",
    method="dino",
    space={
        "dino.teacher_temperature": tune.uniform(0.02, 0.08),
        "dino.student_temperature": tune.uniform(0.05, 0.2),
        "dino.center_momentum": tune.uniform(0.8, 0.99),
    },
    seed_point={"dino.teacher_temperature": 0.04, "dino.student_temperature": 0.1, "dino.center_momentum": 0.9},
    description=__doc__,
)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
