"""Compare methods: each method sweep's exported best backbone against ImageNet and random init,
with the linear probe and gradient finetuning: the study's two tables, with paired p-values.

    python sweeps/compare_methods.py --from-sweeps moco_variance,barlow_lambda,spark_mask \\
        --imagenet-weights resnet50=resnet50-0676ba61.pth
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxrtune.sweep.fewshot import FewshotSweep, main

SWEEP = FewshotSweep(name="compare_methods", evaluators=("probe", "finetune"), description=__doc__)

if __name__ == "__main__":
    sys.exit(main(SWEEP))
