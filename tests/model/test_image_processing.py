"""Phi3VImageProcessor: the HD transform's sizes, token counts and pixels (checked against an independent rewrite)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phivision.model.image_processing_phi3_v import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Phi3VImageProcessor,
    hd_geometry,
)

WHITE = [
    (1.0 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, strict=True)
]  # white after normalisation
BLACK = [(0.0 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, strict=True)]


def untile(pixel_values: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Reassemble the HD image (3, H, W) from the row-major crops in slots 1..rows*cols."""
    rows, cols = height // size, width // size
    crops = pixel_values[1 : 1 + rows * cols]
    return torch.cat([torch.cat(list(crops[r * cols : (r + 1) * cols]), dim=2) for r in range(rows)], dim=1)


# Spec section 3's worked examples, plus a very wide image:
# (width, height, num_crops, HD [H, W], tokens, used crops)
WORKED_EXAMPLES = [
    (1000, 750, 16, [1008, 1344], 1921, 12),
    (336, 336, 16, [1344, 1344], 2509, 16),
    (200, 3000, 16, [5040, 336], 2497, 15),
    (50, 8000, 16, [5376, 336], 2653, 16),
    (1920, 1080, 16, [1008, 1680], 2353, 15),
    (1920, 1080, 4, [672, 672], 757, 4),
    (640, 480, 1, [336, 336], 313, 1),
    (4000, 100, 16, [336, 5376], 2473, 16),
]


@pytest.mark.parametrize(("width", "height", "num_crops", "hd_size", "tokens", "used"), WORKED_EXAMPLES)
def test_worked_examples(width, height, num_crops, hd_size, tokens, used):
    processor = Phi3VImageProcessor()
    image = Image.new("RGB", (width, height), (10, 120, 200))
    out = processor(images=[image], num_crops=num_crops, return_tensors="pt")

    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
    assert out["image_sizes"].tolist() == [hd_size]
    assert out["num_img_tokens"] == [tokens]
    assert processor.calc_num_image_tokens(width, height, num_crops) == tokens
    # Slots after the used crops are exact zeros; the used ones are not.
    pixel_values = out["pixel_values"][0]
    assert torch.all(pixel_values[1 + used :] == 0)
    assert all(pixel_values[i].abs().sum() > 0 for i in range(1 + used))


def test_token_formula_uses_the_tile_grid_side():
    """Tiny tiles: 56 px -> 2x2 merged grid, so 1000x750 at 16 crops (3x4 tiles) is (12+1)*4 + 1 + 4*2."""
    processor = Phi3VImageProcessor(crop_size=56)
    assert processor.num_img_tokens == 4
    assert processor.calc_num_image_tokens(1000, 750) == 61
    assert Phi3VImageProcessor().num_img_tokens == 144


@pytest.mark.parametrize(
    ("width", "height", "num_crops", "top", "bottom"),
    [(1920, 1080, 16, 31, 32), (1920, 1080, 4, 147, 147), (640, 480, 1, 42, 42)],
)
def test_padding_is_white_and_split_top_bottom(width, height, num_crops, top, bottom):
    processor = Phi3VImageProcessor()
    out = processor(images=[Image.new("RGB", (width, height), (0, 0, 0))], num_crops=num_crops)
    hd_h, hd_w = out["image_sizes"][0].tolist()
    hd = untile(out["pixel_values"][0], hd_h, hd_w, 336)
    white, black = torch.tensor(WHITE).view(3, 1, 1), torch.tensor(BLACK).view(3, 1, 1)
    assert torch.allclose(hd[:, :top], white.expand(3, top, hd_w), atol=1e-5)
    assert torch.allclose(hd[:, hd_h - bottom :], white.expand(3, bottom, hd_w), atol=1e-5)
    assert torch.allclose(hd[:, top : hd_h - bottom], black.expand(3, hd_h - top - bottom, hd_w), atol=1e-5)


def test_tall_image_is_padded_left_and_right():
    """50x8000 is processed transposed: 5376x33 padded 151/152, which becomes left/right columns."""
    processor = Phi3VImageProcessor()
    out = processor(images=[Image.new("RGB", (50, 8000), (0, 0, 0))])
    hd = untile(out["pixel_values"][0], 5376, 336, 336)
    white, black = torch.tensor(WHITE).view(3, 1, 1), torch.tensor(BLACK).view(3, 1, 1)
    assert torch.allclose(hd[:, :, :151], white.expand(3, 5376, 151), atol=1e-5)
    assert torch.allclose(hd[:, :, 151:184], black.expand(3, 5376, 33), atol=1e-5)
    assert torch.allclose(hd[:, :, 184:], white.expand(3, 5376, 152), atol=1e-5)


def test_extreme_aspect_ratio_keeps_one_row():
    geometry = hd_geometry(20000, 1, num_crops=16, crop_size=336)
    assert geometry.resized == (5376, 1)
    assert geometry.padded == (5376, 336)


# ------------------------------------------------------------------------------------- pixel parity


def reference_pixel_values(image: Image.Image, num_crops: int, size: int) -> tuple[torch.Tensor, list[int]]:
    """The HD transform written out independently, step by step (spec section 3)."""
    image = image.convert("RGB")
    w, h = image.size
    transposed = w < h
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        w, h = h, w
    ratio = w / h
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = size * scale
    new_h = int(new_w / ratio)
    arr = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    target = math.ceil(new_h / size) * size
    top = (target - new_h) // 2
    arr = np.pad(arr, ((top, target - new_h - top), (0, 0), (0, 0)), constant_values=255)
    if transposed:
        arr = arr.transpose(1, 0, 2)
    x = torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1) / 255.0
    for c in range(3):
        x[c] = (x[c] - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]
    H, W = x.shape[1:]
    tiles = [F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False)[0]]
    for r in range(H // size):
        for c in range(W // size):
            tiles.append(x[:, r * size : (r + 1) * size, c * size : (c + 1) * size])
    while len(tiles) < num_crops + 1:
        tiles.append(torch.zeros(3, size, size))
    return torch.stack(tiles), [H, W]


@pytest.mark.parametrize(("width", "height"), [(300, 170), (130, 410), (200, 200)])
@pytest.mark.parametrize(("size", "num_crops"), [(56, 6), (336, 4)])
def test_pixels_match_an_independent_computation(width, height, size, num_crops):
    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    processor = Phi3VImageProcessor(crop_size=size, num_crops=num_crops)
    out = processor(images=[image], return_tensors="pt")
    expected, hd_size = reference_pixel_values(image, num_crops, size)
    assert out["image_sizes"].tolist() == [hd_size]
    torch.testing.assert_close(out["pixel_values"][0], expected, atol=1e-5, rtol=0)


def test_several_images_are_stacked_in_order():
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(90, 60), (60, 150)]
    ]
    processor = Phi3VImageProcessor(crop_size=56, num_crops=4)
    batch = processor(images=images)
    for i, image in enumerate(images):
        single = processor(images=[image])
        torch.testing.assert_close(batch["pixel_values"][i], single["pixel_values"][0])
        assert batch["image_sizes"][i].tolist() == single["image_sizes"][0].tolist()
        assert batch["num_img_tokens"][i] == single["num_img_tokens"][0]


def test_input_kinds_give_the_same_pixels():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (70, 110, 3), dtype=np.uint8)
    processor = Phi3VImageProcessor(crop_size=56, num_crops=4)
    expected = processor(images=[Image.fromarray(array)])["pixel_values"]
    from_hwc = processor(images=[array])["pixel_values"]
    from_chw = processor(images=[array.transpose(2, 0, 1)])["pixel_values"]
    rgba = Image.fromarray(np.concatenate([array, np.full((70, 110, 1), 255, np.uint8)], axis=2), "RGBA")
    torch.testing.assert_close(from_hwc, expected)
    torch.testing.assert_close(from_chw, expected)
    torch.testing.assert_close(processor(images=[rgba])["pixel_values"], expected)
    gray = processor(images=[Image.fromarray(array[..., 0], "L")])["pixel_values"]
    assert gray.shape == expected.shape


def test_bad_inputs_raise():
    processor = Phi3VImageProcessor(crop_size=56)
    with pytest.raises(TypeError, match="uint8"):
        processor(images=[np.zeros((10, 10, 3), dtype=np.float32)])
    with pytest.raises(TypeError, match="PIL"):
        processor(images=["not an image"])
    with pytest.raises(ValueError, match="return_tensors"):
        processor(images=[Image.new("RGB", (8, 8))], return_tensors="np")
    with pytest.raises(ValueError, match="square"):
        Phi3VImageProcessor(num_img_tokens=10)


# ------------------------------------------------------------------------------------- config files


def test_official_preprocessor_config_loads(tmp_path):
    official = {
        "auto_map": {
            "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        },
        "image_mean": OPENAI_CLIP_MEAN,
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": OPENAI_CLIP_STD,
        "num_crops": 16,
        "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official))
    processor = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert (processor.num_crops, processor.num_img_tokens, processor.crop_size) == (16, 144, 336)
    assert processor.calc_num_image_tokens(1000, 750) == 1921
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=4).num_crops == 4

    saved = processor.to_dict()
    assert "auto_map" not in saved  # the hub code it points at is not shipped with our checkpoints
    for key in (
        "num_crops",
        "num_img_tokens",
        "image_mean",
        "image_std",
        "image_processor_type",
        "processor_class",
    ):
        assert saved[key] == official[key]


def test_save_and_reload_keeps_the_crop_size(tmp_path):
    Phi3VImageProcessor(crop_size=56, num_crops=4).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["crop_size"] == 56 and saved["num_crops"] == 4 and saved["num_img_tokens"] == 4
    reloaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.crop_size, reloaded.num_crops, reloaded.num_img_tokens) == (56, 4, 4)
