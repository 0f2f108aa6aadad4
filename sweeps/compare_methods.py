"""Compare methods: each method sweep's exported best backbone against ImageNet and random init,
with the linear probe and gradient finetuning: the study's two tables, with paired p-values.

    python sweeps/compare_methods.py --from-sweeps moco_variance,barlow_lambda,spark_mask \\
        --imagenet-weights resnet50=resnet50-0676ba61.pth
"""

import _checkout  # noqa: F401  (cxrtune importable from a checkout, installed or not)
from cxrtune.sweep.fewshot import FewshotSweep, main

SWEEP = FewshotSweep(name="compare_methods", evaluators=("probe", "finetune"), description=__doc__)

if __name__ == "__main__":
    raise SystemExit(main(SWEEP))
