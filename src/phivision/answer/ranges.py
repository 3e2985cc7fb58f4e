"""Answers with price ranges: the range of one generated answer, and the calibration of a model on a split.

A model is calibrated once, on items it did not train on (the val split): it answers them with the price spread
recorded (:mod:`phivision.answer.price_spread`), and the spread-scaled errors of those answers are its
calibration (:mod:`phivision.answer.calibration`), stored as ``RUN/calibration.json`` at the end of training.
Every later answer's range follows from its own price and spread and that calibration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from phivision.answer.calibration import PriceCalibration, PriceRange, calibrate
from phivision.answer.constrain import AnswerConstraint
from phivision.answer.generate import answer_image_files
from phivision.answer.prompt import PromptFormat, parse_answer
from phivision.args import PRICE_LEVEL
from phivision.data.layout import load_catalog
from phivision.errors import PhivisionError


def answer_range(
    completion: Any,
    prompt: PromptFormat,
    calibration: PriceCalibration | None,
    level: float = PRICE_LEVEL,
    plot: bool = False,
) -> PriceRange:
    """The price range of one :class:`phivision.answer.generate.Completion` (None, None without a calibration,
    a price or a recorded price distribution; ``completion`` None for an unreadable image). ``plot``: also the
    ranges at the calibration plot's levels."""
    if calibration is None:
        return PriceRange(None, None, level)
    distribution = getattr(completion, "price_distribution", None)
    price = parse_answer(completion.text, prompt).price if completion is not None else None
    spread = distribution.spread if distribution is not None else None
    return calibration.price_range(price, spread, level, plot)  # no range where either is missing


def calibrate_model(
    loaded: Any,
    data_dir: str | os.PathLike,
    split: str = "val",
    constraint: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> PriceCalibration:
    """Answer the ``split`` of a dataset (its first ``limit`` items) under ``constraint`` (default: the model's
    own) and calibrate the model's price ranges on them. Raises PhivisionError when the split is empty."""
    data_dir = Path(data_dir)
    catalog = load_catalog(data_dir)
    items = catalog[catalog["split"] == split]
    items = items.head(limit) if limit is not None else items
    if items.empty:
        raise PhivisionError(f"{data_dir / 'catalog.parquet'}: no rows in split {split!r} to calibrate on")
    constraint = constraint or AnswerConstraint.for_model(loaded)
    # the photos evaluate and predict give the model: its first max_images of each product
    paths = [
        [(data_dir / p).resolve() for p in photos[: loaded.max_images]] for photos in items["image_paths"]
    ]
    prices, spreads = [], []
    with tqdm(total=len(paths), desc=f"calibrate on {split}", unit="img", disable=not progress) as bar:
        for _, completion, _ in answer_image_files(
            loaded, paths, 256, batch_size, max_new_tokens, bar, constraint, price_spread=True
        ):
            distribution = getattr(completion, "price_distribution", None)
            prices.append(None if completion is None else parse_answer(completion.text, loaded.prompt).price)
            spreads.append(None if distribution is None else distribution.spread)
    source = f"{split} split of {data_dir} ({len(items)} items)"
    return calibrate(items["full_price"].to_numpy(dtype=float), prices, spreads, source=source)
