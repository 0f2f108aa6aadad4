"""Reports from what sweeps wrote (Tune folders, results Parquet, MLflow runs, the Optuna study).

Analysis never trains a backbone. Nothing lives here yet: the report generator is planned work.
"""
