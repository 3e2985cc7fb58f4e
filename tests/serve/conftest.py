"""Session fixtures for the serve tests: a LoRA run and a full fine-tune run on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import make_full_run, make_lora_run


@pytest.fixture(scope="session")
def lora_run(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_run(Path(tiny_checkpoint), tmp_path_factory.mktemp("lora") / "run")


@pytest.fixture(scope="session")
def full_run(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_full_run(Path(tiny_checkpoint), tmp_path_factory.mktemp("full") / "run")
