"""Catalogs that look like real ones: photo-like images (smooth random colour fields of varied sizes), uneven
categories, log-normal prices per category, titles with shared words and colour variants."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
from fault_server import dbq_row
from PIL import Image

# category: (share of rows, median price, nouns)
CATEGORIES = {
    "handbags": (0.45, 1800.0, ["Tote", "Satchel", "Clutch", "Bucket Bag"]),
    "trench coats": (0.30, 2400.0, ["Trench", "Car Coat", "Mac"]),
    "scarves": (0.15, 480.0, ["Scarf", "Stole"]),
    "belts": (0.10, 390.0, ["Belt"]),
}
ADJECTIVES = ["Vintage Check", "Quilted", "Monogram", "Mini", "Medium", "Small", "Large", "Heritage"]
MATERIALS = ["Leather", "Cotton Gabardine", "Cashmere", "Nylon", "Canvas"]
COLOURS = ["Black", "Archive Beige", "Honey", "Navy", "Burgundy"]


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random colour field: strong low-frequency structure, like a product photo's, and unlike any
    other seed's."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid, "RGB").resize(size, Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_real_like_table(directory: Path, n: int = 240, seed: int = 0) -> Path:
    """A CSV in the DBQ schema (prices as ``$1,290.00``) whose image URLs are local files; returns its path."""
    rng = random.Random(seed)
    photos = directory / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(CATEGORIES)
    counts = [round(CATEGORIES[c][0] * n) for c in names]
    i = 0
    for category, count in zip(names, counts, strict=True):
        _, median, nouns = CATEGORIES[category]
        made = 0
        while made < count:
            title = f"{rng.choice(ADJECTIVES)} {rng.choice(MATERIALS)} {rng.choice(nouns)}"
            price = round(median * float(np.exp(rng.gauss(0, 0.35))) / 10) * 10
            for colour in rng.sample(COLOURS, k=min(count - made, rng.choice([1, 1, 1, 2, 3]))):
                size = (rng.randrange(300, 900, 10), rng.randrange(300, 900, 10))
                path = photos / f"{i}.jpg"
                path.write_bytes(jpeg(photo(seed * 100_000 + i, size)))
                code = f"{80000000 + i}"
                rows.append(dbq_row(code, title, category, f"${price:,.2f}", str(path), color=colour))
                made += 1
                i += 1
    source = directory / "real.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    return source
