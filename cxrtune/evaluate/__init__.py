"""Few-shot evaluators: how a backbone is judged.

``features`` extracts (and caches on disk) frozen features, ``probe`` fits every linear probe of a
grid as one batched optimisation, ``knn`` is the cheap in-loop monitor, ``finetune`` trains the
backbone per episode with the study's recipe, ``metrics``/``stats`` score and compare, and
``run.run_evaluation`` ties them into one tidy results table.
"""
