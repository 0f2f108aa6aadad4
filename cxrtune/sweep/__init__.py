"""The sweep runner: the only part of cxrtune that imports Ray."""

from cxrtune.sweep.runner import SweepSpec, optuna_url, run_sweep, sweep_dir

__all__ = ["SweepSpec", "optuna_url", "run_sweep", "sweep_dir"]
