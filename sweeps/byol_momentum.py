"""BYOL: Optuna over the target momentum tau_base, the learning rate and the weight decay.

The first point evaluated is the paper's tau_base 0.996 at the cpu preset's SGD lr 0.06 and
weight decay 5e-4; on the cpu profile the second is the preset itself (tau_base 0.99, the official
value for runs of 100-300 epochs), so the two trials side by side compare the two momenta. Weight
decay is searched because without negatives it is one of the few forces on the weights besides the
prediction loss (Tian, Chen and Ganguli, ICML 2021, analyse its role in BYOL's dynamics), and the
official code sets it per run length. The ranges hold both the cpu preset (SGD) and the study
recipe (LARS, lr 0.2, weight decay 1.5e-6); on the study or l4 profile fix them with
``--set optim.lr=0.2 --set optim.weight_decay=1.5e-6`` to search tau_base alone.
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from ray import tune

from cxrtune.sweep.cli import PretrainSweep, main

SWEEP = PretrainSweep(
    name="byol_momentum",
    method="byol",
    space={
        "byol.tau_base": tune.uniform(0.95, 0.999),
        "optim.lr": tune.loguniform(0.01, 0.5),
        "optim.weight_decay": tune.loguniform(1e-6, 1e-3),
    },
    seed_point={"byol.tau_base": 0.996, "optim.lr": 0.06, "optim.weight_decay": 5e-4},
    description=__doc__,
)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
