"""THE image loader: every part of phivision opens product photos through :func:`load_image`.

Downloads, training, evaluation and serving must agree on what a valid image is and how it becomes RGB, so
that a photo accepted by ``prepare`` decodes the same way at training and at serving time. ``prepare`` validates
downloads with :func:`check_image`, the same code path with JPEGs decoded at reduced scale (cheaper, same verdict).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from phivision.args import MAX_PIXELS
from phivision.errors import PhivisionError

# 40 megapixels: far above any product photo (and the 336 px crops the model sees), far below a decompression
# bomb that would exhaust memory.
DEFAULT_MAX_PIXELS = MAX_PIXELS


class ImageError(PhivisionError):
    """An image that cannot be used. ``reason`` is short and machine-readable (it is counted in reports):
    ``missing``, ``empty``, ``not_an_image``, ``truncated``, ``corrupt``, ``too_many_pixels``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def load_image(source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``source`` (a path or the file's bytes), decode it fully and return an RGB image.

    EXIF orientation is applied; palette, CMYK, grey, 16-bit and transparent images become 8-bit RGB
    (transparency over white). The pixel count is checked from the header, before decoding, so a
    decompression bomb costs nothing. Raises :class:`ImageError`.
    """
    return _decode(source, max_pixels, reduced=False)[0]


def check_image(
    source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """Check ``source`` the way :func:`load_image` does (same steps, same :class:`ImageError` reasons) without
    building the full-size image; return the image's (width, height) as stored in the file.

    ``prepare`` checks every download with this. A JPEG is decoded at 1/8 scale: libjpeg still reads and
    entropy-decodes every byte of the scan data (a truncated or broken file fails the same way), but skips
    most of the inverse DCT and colour conversion, which makes the check about 3x cheaper than
    :func:`load_image` on baseline JPEGs. Other formats are decoded in full.
    """
    return _decode(source, max_pixels, reduced=True)[1]


def _decode(
    source: str | os.PathLike | bytes, max_pixels: int | None, reduced: bool
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``source`` into RGB; return the image and the size stored in the file (``reduced``: JPEG at 1/8)."""
    name = "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("empty", name)
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError("missing", name)
        if path.stat().st_size == 0:
            raise ImageError("empty", name)
        stream = path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)
        except Image.DecompressionBombError as err:
            raise ImageError("too_many_pixels", f"{name}: {err}") from None
        except UnidentifiedImageError:
            raise ImageError("not_an_image", f"{name}: not a known image format") from None
        except (SyntaxError, ValueError) as err:
            raise ImageError("not_an_image", f"{name}: {err}") from None
        except (OSError, EOFError) as err:  # a known format whose header is cut or broken
            raise ImageError(
                "truncated" if "truncat" in str(err).lower() else "corrupt", f"{name}: {err}"
            ) from None
        with image:
            size = image.size
            pixels = image.width * image.height
            if max_pixels is not None and pixels > max_pixels:
                raise ImageError("too_many_pixels", f"{name}: {image.width}x{image.height} > {max_pixels}")
            try:
                if reduced:
                    image.draft(None, (1, 1))  # JPEG only (a no-op elsewhere): DCT scaling, 1/8 per side
                image.load()
            except Image.DecompressionBombError as err:
                raise ImageError("too_many_pixels", f"{name}: {err}") from None
            except (OSError, SyntaxError, ValueError, EOFError) as err:
                reason = "truncated" if "truncat" in str(err).lower() else "corrupt"
                raise ImageError(reason, f"{name}: {err}") from None
            with contextlib.suppress(Exception):  # a broken EXIF block must not reject a photo that decodes
                image = ImageOps.exif_transpose(image)
            return to_rgb(image), size


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha is composited over white, 16/32-bit grey is rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
