"""A small hand-made catalog with category levels, and an answer source that knows the truth (for report tests)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from PIL import Image, ImageDraw

from phivision.answer.generate import Completion
from phivision.answer.price_spread import PriceDistribution
from phivision.answer.prompt import parse_answer
from phivision.io import atomic_write_parquet

CATEGORIES = {  # leaf -> (category1_code, category2_code)
    "Bags": ("WOMEN", "ACCESSORIES"),
    "Scarves": ("WOMEN", "ACCESSORIES"),
    "Coats": ("MEN", "CLOTHING"),
    "Shirts": ("MEN", "CLOTHING"),
}
PRICES = [32.0, 90.0, 250.0, 640.0, 1290.0, 3400.0, 9800.0, 70000.0]
SIZES = [(64, 64), (120, 60), (60, 140), (96, 96)]


def write_catalog(directory: Path, n: int = 24) -> Path:
    """n products, every other one in test; image i is a PNG whose top-left red value is i (read by oracle)."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    leaves = list(CATEGORIES)
    rows = []
    for i in range(n):
        leaf = leaves[(i // 2) % len(leaves)]  # both splits get every category
        image = Image.new("RGB", SIZES[i % len(SIZES)], (40 + 50 * (i % 4), 120, 200 - 40 * (i % 5)))
        ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(250, 220, 30 * (i % 8)))
        image.putpixel((0, 0), (i, 0, 0))
        rel = f"images/item{i:03d}.png"
        image.save(directory / rel)
        rows.append(
            {
                "product_code": f"P{i:03d}",
                "title": f"{['Check', 'Plain', 'Quilted'][i % 3]} {leaf[:-1]} {i}",
                "category": leaf,
                "full_price": PRICES[i % len(PRICES)] * (1 + i / 100),
                "currency": "USD",
                "image_path": rel,
                "split": "test" if i % 2 else "train",
                "category1_code": CATEGORIES[leaf][0],
                "category2_code": CATEGORIES[leaf][1],
            }
        )
    atomic_write_parquet(directory / "catalog.parquet", pd.DataFrame(rows))
    return directory


def oracle_answers(catalog: pd.DataFrame, quality: str):
    """A stand-in for generate_completions that reads the item index from pixel (0, 0) and answers from the
    truth, with a price spread that grows with the answer's error (when the caller asks for one).

    ``quality`` "good": mostly right with a few misses of each kind; "poor": many misses (the "before" model).
    """
    answer_texts = oracle_texts(catalog, quality)

    def generate_completions(model, processor, images, *args, price_spread=False, **kwargs):
        completions = []
        for item, text in zip(images, answer_texts(images), strict=True):
            image = item[0] if isinstance(item, list) else item  # an item is a photo or a product's photos
            row = catalog.iloc[image.getpixel((0, 0))[0]]
            price = parse_answer(text).price
            distribution = None
            if price_spread and price is not None:
                spread = abs(math.log(price / row.full_price)) + 0.02  # the model is about as unsure as wrong
                distribution = PriceDistribution(price, (price, price * math.exp(2 * spread)), (0.5, 0.5))
            completions.append(Completion(text, 10, len(text.split()), True, distribution))
        return completions

    return generate_completions


def oracle_texts(catalog: pd.DataFrame, quality: str):
    def generate_answers(images):
        answers = []
        for item in images:
            image = item[0] if isinstance(item, list) else item  # an item is a photo or a product's photos
            row = catalog.iloc[image.getpixel((0, 0))[0]]
            kind = row.name % 6 if quality == "good" else (2, 3, 5)[row.name % 3]
            price = row.full_price * {0: 1.0, 1: 1.04, 2: 0.6, 3: 2.5, 4: 1.0, 5: 1.0}[kind]
            category = (
                row.category if kind not in (3, 5) else "Shirts" if row.category != "Shirts" else "Bags"
            )
            if kind == 5:
                answers.append("I cannot tell.")
            elif kind == 4:
                answers.append(f"Product: {row.title}, Category: {category}")
            else:
                answers.append(f"Product: {row.title}, Category: {category}, Full Price: ${price:,.2f}")
        return answers

    return generate_answers


class ScriptedHead(torch.nn.Module):
    """Stands in for ``lm_head``: forward call k (generation step k) puts the top logit on ``script[k]``."""

    def __init__(self, vocab_size: int, script: list[int]) -> None:
        super().__init__()
        self.vocab_size, self.script, self.calls = vocab_size, script, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.zeros(*hidden.shape[:2], self.vocab_size)
        logits[..., token] = 1.0
        return logits
