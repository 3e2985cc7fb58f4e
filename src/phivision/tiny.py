"""Tiny random Phi-3-Vision checkpoints in the official layout, for tests and demos.

The checkpoint has the same files and config fields as the real one (``rope_scaling`` of type "su" with
``original_max_position_embeddings``, ``embd_layer``, ``img_processor``, the model code with its ``auto_map``), so
it goes through the very same ``from_pretrained`` path; only the sizes differ, and
``img_processor["vision_config"]`` shrinks the CLIP tower.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from phivision.errors import PhivisionError
from phivision.io import atomic_directory, require_empty_dir
from phivision.model import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor, save_checkpoint
from phivision.model.configuration_phi3_v import DEFAULT_EMBD_LAYER, Phi3VConfig
from phivision.tiny_tokenizer import build_tiny_tokenizer

# Small CLIP: a 56 px tile is a 4x4 patch grid, i.e. 2x2 = 4 tokens per tile after the 2x2 merge.
TINY_VISION = {
    "image_size": 56,
    "patch_size": 14,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 64,
}

# Small decoder; the official layout's other fields (dropouts, eps, rope_theta, ...) keep their official values.
TINY_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 2048,
    "sliding_window": 4096,
}


def tiny_config(
    vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, **overrides: Any
) -> Phi3VConfig:
    """A tiny Phi3VConfig in the official layout.

    Args:
        vocab_size, bos_token_id, eos_token_id, pad_token_id: from the tokenizer.
        overrides: top-level config fields (``hidden_size=64``...); ``vision={...}`` updates the CLIP tower.
    """
    vision = {**TINY_VISION, **overrides.pop("vision", {})}
    text = {**TINY_TEXT, **overrides}
    unknown = sorted(set(text) - set(Phi3VConfig().to_dict()))
    if unknown:
        raise PhivisionError(f"tiny checkpoint: unknown config override(s) {', '.join(unknown)}")
    half_head = text["hidden_size"] // text["num_attention_heads"] // 2
    grid = vision["image_size"] // vision["patch_size"]
    return Phi3VConfig(
        architectures=["Phi3VForCausalLM"],
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rope_scaling={
            "type": "su",
            # Shaped like the official lists (length head_dim / 2, growing with the frequency index).
            "long_factor": [round(1.0 + 3.0 * i / max(half_head - 1, 1), 4) for i in range(half_head)],
            "short_factor": [round(1.0 + 0.5 * i / max(half_head - 1, 1), 4) for i in range(half_head)],
        },
        embd_layer=dict(DEFAULT_EMBD_LAYER),
        img_processor={
            "image_dim_out": vision["hidden_size"],
            "model_name": "phivision/tiny-clip",
            "name": "clip_vision_model",
            "num_img_tokens": (grid // 2) ** 2,
            "vision_config": vision,
        },
        torch_dtype="float32",
        **text,
    )


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    num_crops: int = 4,
    tokenizer_vocab_size: int = 1024,
    **overrides: Any,
) -> Path:
    """Write a random tiny checkpoint: config.json, model.safetensors, tokenizer files, preprocessor_config.json
    and the model code (loadable with ``trust_remote_code=True`` where phivision is not installed).

    Args:
        out_dir: directory to create; it must not exist or be empty. Written whole or not at all.
        seed: seeds the weights (same seed, same weights).
        corpus: extra text for the tokenizer to learn from (e.g. a catalog's titles).
        num_crops: the processor's maximum number of tiles per image.
        tokenizer_vocab_size: upper bound on the tiny tokenizer's vocabulary.
        overrides: config fields, see :func:`tiny_config`.

    Returns:
        The checkpoint directory.
    """
    out = require_empty_dir(out_dir)  # checked before the work; atomic_directory checks again at the end
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=tokenizer_vocab_size)
    config = tiny_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    vision = config.vision_tower_config()
    image_processor = Phi3VImageProcessor(
        num_crops=num_crops,
        crop_size=vision.image_size,
        num_img_tokens=config.img_processor["num_img_tokens"],
    )
    processor = Phi3VProcessor(image_processor=image_processor, tokenizer=tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3VForCausalLM(config)

    with atomic_directory(out) as tmp:  # no half-written checkpoint on failure
        save_checkpoint(model, processor, tmp)
    return out
