"""Fine-tuning: ``train(load_config(...))`` writes a RUN directory (weights, processor, config, metrics).

The recipe is written out in :mod:`phivision.train.loop`; configs are typed option groups read from YAML
(:mod:`phivision.train.config`).
"""

from phivision.train.config import TrainConfig, load_config
from phivision.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
