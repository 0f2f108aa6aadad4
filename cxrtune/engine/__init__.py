"""The pretraining engine: configs and profiles, the training loop, checkpoints, monitors."""

from cxrtune.engine.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from cxrtune.engine.profiles import PROFILES, cpu, profile, smoke, study
from cxrtune.engine.train import PretrainResult, pretrain, read_metrics
from cxrtune.errors import DivergenceError

__all__ = ["ModelConfig", "OptimConfig", "PretrainConfig", "TrainConfig", "PROFILES", "cpu", "profile", "smoke",
           "study", "PretrainResult", "pretrain", "read_metrics", "DivergenceError"]
