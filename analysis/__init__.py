"""Reports from what sweeps wrote (Tune folders, results Parquet, MLflow runs, the Optuna study).

``python analysis/report.py --sweep NAME`` (or ``cxrtune report``) writes one self-contained
HTML report per sweep; ``cxrtune compare`` puts several sweeps or checkpoints side by side.
Analysis never trains a backbone: the only model it fits is the logistic head that Grad-CAM
needs to have a class score to differentiate.
"""
