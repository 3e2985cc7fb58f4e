"""What the two HTML pages share (``phivision inspect``'s and ``phivision report``'s): a matplotlib figure and a
photo each become a ``data:`` URI, so a page is one self-contained file with no outside request and no script.

A photo is read by the one image loader (:func:`phivision.data.images.load_image`: decompression bombs refused,
EXIF orientation applied), so a thumbnail shows what the model sees.
"""

from __future__ import annotations

import base64
import io
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from phivision.data.images import ImageError, load_image


def figure_uri(figure: Figure, dpi: int = 100, pad_inches: float = 0.1) -> str:
    """A figure as a PNG ``data:`` URI, cropped to what it draws."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=pad_inches)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def jpeg_uri(image: Image.Image, quality: int = 80) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_uri(path: str | os.PathLike | None, side: int) -> str | None:
    """A JPEG of the photo at ``path``, at most ``side`` pixels on a side, as a ``data:`` URI; None when the
    file is gone or is not a readable image."""
    if not path or not os.path.isfile(path):
        return None
    try:
        image = load_image(path)
    except ImageError:
        return None
    image.thumbnail((side, side))
    return jpeg_uri(image)
