"""THE image loader: every part of phivision opens product photos through :func:`open_image` (and so through
:func:`load_image`, :func:`check_image` or :func:`image_size`).

Downloads, training, evaluation and serving must agree on what a valid image is and how it becomes RGB, so
that a photo accepted by ``prepare`` decodes the same way at training and at serving time. ``prepare`` validates
downloads with :func:`check_image`, the same code path with JPEGs decoded at reduced scale (cheaper, same verdict).

Only the formats a product photo comes in are decoded (:data:`ALLOWED_FORMATS`); Pillow's other decoders (EPS,
which runs Ghostscript, PSD, ICO, PDF-like and scientific formats) are never reached: such a file is refused with
its format named. A file on disk is read whole first, and only if it is a regular file of at most ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from phivision.args import MAX_BYTES, MAX_PIXELS
from phivision.errors import PhivisionError
from phivision.io import ReadError, read_bytes_bounded

# 40 megapixels: far above any product photo (and the 336 px crops the model sees), far below a decompression
# bomb that would exhaust memory.
DEFAULT_MAX_PIXELS = MAX_PIXELS
DEFAULT_MAX_BYTES = MAX_BYTES
# The formats product photos come in (a JPEG holding several pictures opens as MPO, through the JPEG decoder).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "TIFF", "BMP")
EXIF_ORIENTATION = 0x0112
ROTATED = {5, 6, 7, 8}  # orientations that swap width and height


class ImageError(PhivisionError):
    """An image that cannot be used. ``reason`` is short and machine-readable (it is counted in reports):
    ``missing``, ``unreadable``, ``not_a_file``, ``too_large``, ``empty``, ``not_an_image``, ``unsupported_format``,
    ``truncated``, ``corrupt``, ``too_many_pixels``. ``found``: the refused format (``unsupported_format``)."""

    def __init__(self, reason: str, detail: str = "", found: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.found = found
        super().__init__(f"{reason}: {detail}" if detail else reason)


Source = str | os.PathLike | bytes


def _reason_of(err: Exception) -> str:
    return "truncated" if "truncat" in str(err).lower() else "corrupt"


def _name(source: Source) -> str:
    return "image bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def _read(source: Source, max_bytes: int | None) -> tuple[bytes, str]:
    """The file's bytes and a name for messages; a path must be a regular file of at most ``max_bytes``."""
    name = _name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = read_bytes_bounded(Path(source), max_bytes if max_bytes is not None else 1 << 62)
        except ReadError as err:
            raise ImageError(err.reason, f"{name}: {err.detail}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError("too_large", f"{name}: {len(data):,} bytes, more than {max_bytes:,}")
    if not data:
        raise ImageError("empty", name)
    return data, name


def format_of(data: bytes) -> str | None:
    """The Pillow format whose signature ``data`` starts with (any format Pillow knows, allowed or not), read
    from the first bytes only: no decoder runs."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        with contextlib.suppress(Exception):
            if accept is not None and accept(prefix):
                return name
    return None


@contextlib.contextmanager
def open_image(
    source: Source, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> Iterator[Image.Image]:
    """The image in ``source`` (a path or the file's bytes) opened but not decoded: its header is read, its
    format is one of :data:`ALLOWED_FORMATS` and its pixel count at most ``max_pixels``. Raises
    :class:`ImageError`. Every decoder entry point of phivision goes through here."""
    data, name = _read(source, max_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as err:
            raise ImageError("too_many_pixels", f"{name}: {err}") from None
        except UnidentifiedImageError:
            found = format_of(data)
            if found is not None and found not in ALLOWED_FORMATS:
                raise ImageError(
                    "unsupported_format",
                    f"{name}: a {found} file by its signature; only {', '.join(ALLOWED_FORMATS)} images are accepted",
                    found,
                ) from None
            raise ImageError("not_an_image", f"{name}: not a known image format") from None
        except (SyntaxError, ValueError) as err:
            raise ImageError("not_an_image", f"{name}: {err}") from None
        except (OSError, EOFError) as err:  # a known format whose header is cut or broken
            raise ImageError(_reason_of(err), f"{name}: {err}") from None
        with image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageError("too_many_pixels", f"{name}: {image.width}x{image.height} > {max_pixels}")
            yield image


def image_size(
    source: Source, max_pixels: int | None = DEFAULT_MAX_PIXELS, upright: bool = False
) -> tuple[int, int]:
    """(width, height) from the header alone, checked as :func:`open_image` checks it; ``upright``: as
    :func:`load_image` returns it (EXIF rotation applied)."""
    with open_image(source, max_pixels) as image:
        width, height = image.size
        if upright:
            with contextlib.suppress(Exception):
                if image.getexif().get(EXIF_ORIENTATION) in ROTATED:
                    width, height = height, width
    return width, height


def load_image(source: Source, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``source`` (a path or the file's bytes), decode it fully and return an RGB image.

    EXIF orientation is applied; palette, CMYK, grey, 16-bit and transparent images become 8-bit RGB
    (transparency over white). The format and the pixel count are checked from the header, before decoding,
    so a decompression bomb or a refused format costs nothing. Raises :class:`ImageError`.
    """
    return _decode(source, max_pixels, reduced=False)[0]


def check_image(source: Source, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check ``source`` the way :func:`load_image` does (same steps, same :class:`ImageError` reasons) without
    building the full-size image; return the image's (width, height) as stored in the file.

    ``prepare`` checks every download with this. A JPEG is decoded at 1/8 scale: libjpeg still reads and
    entropy-decodes every byte of the scan data (a truncated or broken file fails the same way), but skips
    most of the inverse DCT and colour conversion, which makes the check about 3x cheaper than
    :func:`load_image` on baseline JPEGs. Other formats are decoded in full.
    """
    return _decode(source, max_pixels, reduced=True)[1]


def _decode(source: Source, max_pixels: int | None, reduced: bool) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``source`` into RGB; return the image and the size stored in the file (``reduced``: JPEG at 1/8)."""
    with open_image(source, max_pixels) as image:
        name, size = _name(source), image.size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                if reduced:
                    image.draft(None, (1, 1))  # JPEG only (a no-op elsewhere): DCT scaling, 1/8 per side
                image.load()
            except Image.DecompressionBombError as err:
                raise ImageError("too_many_pixels", f"{name}: {err}") from None
            except (OSError, SyntaxError, ValueError, EOFError) as err:
                raise ImageError(_reason_of(err), f"{name}: {err}") from None
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
