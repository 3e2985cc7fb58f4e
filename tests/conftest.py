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
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's directory for all workers: the parent of each xdist worker's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Phi-3-Vision checkpoint in the official layout, written once per test session."""
    from phivision.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


# A small stand-in of the real checkpoint: the real config, tokenizer (32,045 ids) and 32,064-row embedding, the
# real 336 px tile and 14 px patch, everything else narrow and shallow.
SMALL_STANDIN = {
    "num_hidden_layers": 1,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
}


@pytest.fixture(scope="session")
def real_tokenizer_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random checkpoint with the real tokenizer and vocabulary (float32, 1 crop per image)."""
    import torch

    from phivision.model.standin import write_standin_checkpoint

    out = tmp_path_factory.mktemp("real-tokenizer") / "ckpt"
    return write_standin_checkpoint(out, REFERENCE_DIR, dtype=torch.float32, num_crops=1, **SMALL_STANDIN)


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic catalog in the dataset layout."""
    from phivision.data.sample import write_sample_catalog

    return write_sample_catalog(tmp_path_factory.mktemp("sample") / "data", n=60, seed=0)
