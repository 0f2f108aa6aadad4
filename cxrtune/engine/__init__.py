"""The pretraining engine: configs, the training loop, checkpoints, monitors."""

from cxrtune.engine.config import ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from cxrtune.engine.train import PretrainResult, pretrain, read_metrics
from cxrtune.errors import DivergenceError

__all__ = ["ModelConfig", "OptimConfig", "PretrainConfig", "TrainConfig", "PretrainResult", "pretrain", "read_metrics",
           "DivergenceError"]
