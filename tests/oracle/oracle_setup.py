"""The oracle stage's settings: the stand-in checkpoint both sides load, where the official code lives, test photos.

Imported by the tests and by ``benchmarks/bench_vs_official.py`` (phivision's side only: the official side,
official_side.py, runs in the oracle environment and imports none of this).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
REFERENCE_NAME = "phi-3-vision-128k-instruct"
# The oracle stand-in: the real config, tokenizer and CLIP geometry (336 px tiles, patch 14, width 1024), with
# few layers. Two heads of the real head size (96) keep the real LongRoPE factor lists as they are; a shorter
# original context (1,024 instead of 4,096) puts the two- and four-image prompts on LongRoPE's long factors
# while the one-image prompt stays on the short ones, so both branches are compared.
STANDIN = {
    "num_hidden_layers": 2,
    "hidden_size": 192,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "original_max_position_embeddings": 1024,
    "vision": {"num_hidden_layers": 3},
}
# Weights drawn with a larger spread than the config's 0.02, so that the images and the positions move the logits
# and greedy decoding does not settle on one repeated token.
STANDIN_STD = 0.12
# The weights' seed: with it no greedy step of the compared prompts is a near-tie (the two best logits are at
# least 6e-3 apart, 35x the logit bound), so equal tokens are not decided by rounding (seed 0 has a 4e-4 gap).
STANDIN_SEED = 1
NUM_CROPS = 4


def shared_reference() -> Path:
    """``shared/reference`` beside the repository (as CI lays it), or ``$PHIVISION_SHARED_REFERENCE``."""
    return Path(os.environ.get("PHIVISION_SHARED_REFERENCE", REPO.parent / "shared" / "reference"))


def write_oracle_standin(out: Path, reference: Path, **overrides: object) -> Path:
    """The stand-in both sides load: float32, :data:`STANDIN` (updated by ``overrides``), the official code
    beside the weights as the download has it."""
    from phivision.model.standin import write_standin_checkpoint

    return write_standin_checkpoint(
        out,
        reference,
        dtype=torch.float32,
        std=STANDIN_STD,
        seed=STANDIN_SEED,
        num_crops=NUM_CROPS,
        official_code=True,
        **{**STANDIN, **overrides},
    )


def product_photo(size: tuple[int, int], colour: tuple[int, int, int], shape: str) -> Image.Image:
    """A product-like picture: a coloured object on a light background, with some texture."""
    image = Image.new("RGB", size, (246, 244, 240))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 6, size[1] // 6, size[0] * 5 // 6, size[1] * 5 // 6)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, colour)
    for x in range(0, size[0], max(1, size[0] // 9)):
        draw.line((x, 0, x + size[1] // 3, size[1]), fill=(colour[2], colour[0], colour[1]), width=2)
    return image
