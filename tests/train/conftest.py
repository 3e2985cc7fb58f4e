"""Helpers for the training tests: a short run config on the session's tiny checkpoint and sample catalog."""

from __future__ import annotations

import pytest

from phivision.train.config import TrainConfig, load_config


@pytest.fixture
def quick_config(tiny_checkpoint, sample_dataset, tmp_path):
    """A config for a few fast steps; ``quick_config("name", "key=value", ...)``."""

    def make(name: str = "run", *overrides: str) -> TrainConfig:
        base = [
            "data.batch_size=2",
            "schedule.max_steps=4",
            "optim.lr=1e-3",
            "tracking.log_every=1",
            "eval.gen_samples=2",
            "eval.max_samples=4",
            "eval.max_new_tokens=8",
            "lora.dropout=0.0",
        ]
        return load_config(
            None,
            base + list(overrides),
            model=str(tiny_checkpoint),
            out=str(tmp_path / name),
            data={"path": str(sample_dataset)},
        )

    return make
