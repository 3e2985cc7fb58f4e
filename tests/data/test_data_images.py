"""The one image loader: every mode becomes RGB, EXIF orientation is applied, bad files fail with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fault_server import bomb_bytes, image_bytes
from PIL import Image

from phivision.data import ImageError, check_image, load_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_palette_with_transparency_is_composited_over_white():
    image = Image.new("P", (10, 10), 0)
    image.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    image.paste(1, (0, 0, 5, 10))
    image.info["transparency"] = 0  # the red half is transparent
    rgb = load_image(encode(image, "PNG", transparency=0))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((7, 5)) == (255, 255, 255)
    assert rgb.getpixel((2, 5)) == (0, 0, 255)


def test_rgba_and_la_become_rgb_over_white():
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert load_image(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert load_image(encode(la, "PNG")).getpixel((0, 0)) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    red, green, blue = load_image(encode(cmyk, "JPEG")).getpixel((8, 8))
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_grey_is_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = load_image(data)
    values = np.asarray(rgb)[..., 0]
    assert values.min() == 0 and values.max() == 255
    assert 120 <= values.reshape(-1)[128] <= 135  # the middle of the ramp stays grey, not white


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb = load_image(encode(image, "JPEG", exif=exif))
    assert rgb.size == (20, 40)


def test_path_and_bytes_give_the_same_pixels(tmp_path):
    data = image_bytes(fmt="PNG")
    (tmp_path / "a.png").write_bytes(data)
    assert load_image(tmp_path / "a.png").tobytes() == load_image(data).tobytes()
    assert load_image(str(tmp_path / "a.png")).size == (64, 48)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<html><body>Not found</body></html>", "not_an_image"),
        (image_bytes()[:300], "truncated"),
        (image_bytes(fmt="PNG")[:-30], "truncated"),
        (bomb_bytes(), "too_many_pixels"),
    ],
)
def test_bad_images_fail_with_a_reason(data, reason):
    with pytest.raises(ImageError) as info:
        load_image(data)
    assert info.value.reason == reason
    with pytest.raises(ImageError) as info:  # prepare's cheaper check gives the same verdict
        check_image(data)
    assert info.value.reason == reason


@pytest.mark.parametrize("progressive", [False, True])
def test_check_image_reads_the_whole_jpeg_at_reduced_scale(progressive):
    """check_image decodes JPEGs at 1/8 scale but still reads every byte: a cut anywhere is still caught."""
    noise = Image.effect_noise((320, 240), 40).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG", quality=85, progressive=progressive)
    data = buffer.getvalue()
    assert check_image(data) == (320, 240) == load_image(data).size
    for cut in (len(data) // 4, len(data) // 2, len(data) - 100):
        with pytest.raises(ImageError) as info:
            check_image(data[:cut])
        assert info.value.reason == "truncated"
    with pytest.raises(ImageError, match="too_many_pixels"):
        check_image(data, max_pixels=320 * 240 - 1)


def test_pixel_limit_is_configurable_and_missing_files_fail(tmp_path):
    data = image_bytes(size=(100, 100))
    with pytest.raises(ImageError, match="too_many_pixels"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.reason == "missing"
