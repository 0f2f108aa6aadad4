"""Few-shot grid: given checkpoints plus ImageNet and random init, every evaluator across the full
shot grid, each (backbone x evaluator) a small trial packed with fractional resources.

    python sweeps/fewshot_grid.py --checkpoint runs/moco/export/...             # packed by measured memory
    python sweeps/fewshot_grid.py --checkpoint runs/moco/export/... --gpu 0.25  # four per GPU, as given
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from cxrtune.sweep.fewshot import FewshotSweep, main

SWEEP = FewshotSweep(name="fewshot_grid", evaluators=("probe",), description=__doc__)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
