"""Shared fixtures: a tiny checkpoint and a small synthetic catalog, made locally (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The real Phi-3-Vision checkpoint's small files (config, tokenizer, shard index; no weights): tests/reference/.
REFERENCE_DIR = Path(__file__).parent / "reference" / "phi-3-vision-128k-instruct"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The real checkpoint's config, tokenizer, preprocessor config and shard index (MIT, copied unchanged)."""
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Phi-3-Vision checkpoint in the official layout, written once per test session."""
    from phivision.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic catalog in the dataset layout."""
    from phivision.data.sample import write_sample_catalog

    return write_sample_catalog(tmp_path_factory.mktemp("sample") / "data", n=60, seed=0)
