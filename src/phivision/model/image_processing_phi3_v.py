"""Phi-3-Vision image processor: the HD transform, written with PIL and torch only (no torchvision).

An image is resized (keeping its aspect ratio) onto a grid of at most ``num_crops`` tiles of ``crop_size`` pixels,
padded with white to whole tiles, normalised with the CLIP mean/std and cut into tiles. A global view (the whole
padded image squeezed to one tile) goes first, unused tile slots are zeros:

    pixel_values  (num_images, num_crops + 1, 3, S, S)
    image_sizes   (num_images, 2) = [H, W] of the padded HD image
    num_img_tokens  list of ints: how many ``-k`` ids each image takes in ``input_ids``

Numerically this follows the official hub processor step by step (the project's Phi-3-V spec, section 3). The official code
resizes with ``torchvision.transforms.functional.resize`` on a PIL image, which is ``PIL.Image.resize(size, BILINEAR)``
with no other argument, so calling PIL directly gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class HDGeometry:
    """Sizes of one image through the HD transform (all in the original, untransposed orientation at the end)."""

    transposed: bool  # the image was taller than wide and was processed transposed
    resized: tuple[int, int]  # (width, height) after resizing, in the processing (landscape) orientation
    padded: tuple[int, int]  # (width, height) of the final HD image, back in the original orientation
    grid: tuple[int, int]  # (rows, cols) of tiles in the final HD image


def hd_geometry(width: int, height: int, num_crops: int, crop_size: int) -> HDGeometry:
    """Where an image of ``width x height`` lands in the HD transform, without touching pixels.

    Tall images are handled as their transpose. ``scale`` is the largest tile count along the long side such that
    ``scale * ceil(scale / ratio)`` tiles fit in ``num_crops``; the long side becomes ``scale * crop_size`` and the
    short side ``int(long / ratio)`` (truncated, as the official code), then padded up to whole tiles.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if num_crops < 1:
        raise ValueError(f"num_crops must be at least 1, got {num_crops}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = crop_size * scale
    # The official code would crash on a 0-pixel side (aspect ratios beyond ~1:5000); keep at least one row.
    new_h = max(1, int(new_w / ratio))
    pad_h = math.ceil(new_h / crop_size) * crop_size
    padded = (pad_h, new_w) if transposed else (new_w, pad_h)
    return HDGeometry(
        transposed=transposed,
        resized=(new_w, new_h),
        padded=padded,
        grid=(padded[1] // crop_size, padded[0] // crop_size),
    )


def to_rgb(image: Any) -> Image.Image:
    """A PIL image in RGB from a PIL image (any mode) or a uint8 numpy array (HW, HWC or CHW)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (0-255), got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)  # CHW -> HWC
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3):
            raise ValueError(f"numpy images must be HW, HWC or CHW, got shape {image.shape}")
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"images must be PIL images or uint8 numpy arrays, got {type(image).__name__}")


class Phi3VImagesKwargs(ImagesKwargs, total=False):
    """Settings ``from_pretrained(..., num_crops=4)`` may override."""

    num_crops: int
    num_img_tokens: int


class Phi3VImageProcessor(BaseImageProcessor):
    """The Phi-3-Vision HD image processor; reads and writes the official ``preprocessor_config.json``.

    Args:
        num_crops: maximum number of ``crop_size`` tiles per image (official: 16; 4 is common for several images).
        num_img_tokens: image tokens per tile after the vision tower's 2x2 merge (official: 144 = 12 x 12).
            Defaults to ``(crop_size // 28) ** 2``, i.e. CLIP patch 14 and the 2x2 merge.
        crop_size: tile side ``S`` in pixels (official: 336; tiny test checkpoints use less).
        image_mean, image_std: per-channel normalisation (OpenAI CLIP's).
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImagesKwargs

    def __init__(
        self,
        num_crops: int = 16,
        num_img_tokens: int | None = None,
        crop_size: int = 336,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("auto_map", None)  # the official file points at hub code; this class replaces it
        super().__init__(**kwargs)
        if isinstance(crop_size, dict):  # {"height": S, "width": S} as other HF image processors write it
            if crop_size.get("height") != crop_size.get("width"):
                raise ValueError(f"crop_size must be square, got {crop_size}")
            crop_size = crop_size["height"]
        self.crop_size = int(crop_size)
        self.num_crops = int(num_crops)
        self.num_img_tokens = (
            int(num_img_tokens) if num_img_tokens is not None else (self.crop_size // 28) ** 2
        )
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)
        side = math.isqrt(self.num_img_tokens)
        if side * side != self.num_img_tokens or side < 1:
            raise ValueError(
                f"num_img_tokens (tokens per tile) must be a square number, got {self.num_img_tokens}"
            )
        if self.num_crops < 1 or self.crop_size < 1:
            raise ValueError(
                f"num_crops and crop_size must be positive, got {self.num_crops}, {self.crop_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The saved config: the official keys (``processor_class`` included) plus ``crop_size``."""
        return {**super().to_dict(), "processor_class": "Phi3VProcessor"}

    @property
    def tile_grid_side(self) -> int:
        """Side of a tile's merged token grid (official: 12)."""
        return math.isqrt(self.num_img_tokens)

    def tokens_for_grid(self, rows: int, cols: int) -> int:
        """Image tokens for an HD image of ``rows x cols`` tiles.

        Sub-image grid with one newline per token row, one global separator, global tile with newlines:
        ``(rows*cols + 1) * g*g + 1 + (rows + 1) * g`` with ``g`` the merged grid side.
        """
        g = self.tile_grid_side
        return (rows * cols + 1) * g * g + 1 + (rows + 1) * g

    def calc_num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Image tokens for an image of ``width x height`` pixels (arithmetic only, no pixels)."""
        geometry = hd_geometry(
            width, height, self.num_crops if num_crops is None else num_crops, self.crop_size
        )
        return self.tokens_for_grid(*geometry.grid)

    def calc_num_image_tokens_from_image_size(
        self, width: int, height: int, num_crops: int | None = None
    ) -> int:
        """The official processor's name for :meth:`calc_num_image_tokens` (vLLM calls it by this name)."""
        return self.calc_num_image_tokens(width, height, num_crops)

    def hd_transform(self, image: Any, num_crops: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """One image -> (tiles ``(num_crops+1, 3, S, S)``, ``[H, W]`` of the padded HD image)."""
        num_crops = self.num_crops if num_crops is None else num_crops
        size = self.crop_size
        image = to_rgb(image)
        geometry = hd_geometry(image.width, image.height, num_crops, size)
        if geometry.transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        new_w, new_h = geometry.resized
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        # Pad the short side with white to whole tiles, centred (top gets the smaller half).
        pad_h = geometry.padded[0] if geometry.transposed else geometry.padded[1]
        canvas = Image.new("RGB", (new_w, pad_h), (255, 255, 255))
        canvas.paste(image, (0, (pad_h - new_h) // 2))
        if geometry.transposed:
            canvas = canvas.transpose(Image.Transpose.TRANSPOSE)

        hd = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float().div(255)  # (3, H, W)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        hd = (hd - mean) / std
        _, height, width = hd.shape
        rows, cols = height // size, width // size

        # Global view: the whole padded image squeezed to one tile (aspect ratio not kept, as the official code).
        global_view = F.interpolate(hd[None], size=(size, size), mode="bicubic", align_corners=False)
        # Tiles in row-major order: (3, rows*S, cols*S) -> (rows*cols, 3, S, S).
        crops = hd.reshape(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
        tiles = torch.zeros(num_crops + 1, 3, size, size)
        tiles[0] = global_view[0]
        tiles[1 : 1 + rows * cols] = crops
        return tiles, [height, width]

    def preprocess(
        self, images: Any, num_crops: int | None = None, return_tensors: str | None = "pt", **kwargs: Any
    ) -> BatchFeature:
        """Images (one, or a list of PIL images / uint8 arrays) -> ``pixel_values``, ``image_sizes``, ``num_img_tokens``.

        Always returns torch tensors (the only framework the model supports); ``num_img_tokens`` stays a list.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        num_crops = self.num_crops if num_crops is None else num_crops
        pixel_values, image_sizes, num_img_tokens = [], [], []
        for image in images:
            tiles, (height, width) = self.hd_transform(image, num_crops)
            pixel_values.append(tiles)
            image_sizes.append([height, width])
            num_img_tokens.append(self.tokens_for_grid(height // self.crop_size, width // self.crop_size))
        return BatchFeature(
            data={
                "pixel_values": torch.stack(pixel_values),
                "image_sizes": torch.tensor(image_sizes, dtype=torch.long),
                "num_img_tokens": num_img_tokens,
            }
        )

    def __call__(self, images: Any = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)
