"""Fine-tuning: ``train(load_config(...))`` writes a RUN directory (weights, processor, config, metrics).

The recipe is written out in :mod:`phivision.train.loop`; configs are typed dataclasses read from YAML
(:mod:`phivision.train.config`). The loop (and with it torch) is imported on first use, so reading or printing
a config stays light.
"""

from typing import Any

from phivision.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "train"):
        from phivision.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'phivision.train' has no attribute {name!r}")
