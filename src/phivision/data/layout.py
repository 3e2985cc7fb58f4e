"""The dataset layout every part reads: ``DIR/catalog.parquet``, ``DIR/images/``, ``DIR/prepare_report.json``."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from phivision.errors import PhivisionError

CATALOG_FILE = "catalog.parquet"
IMAGES_DIR = "images"
REPORT_FILE = "prepare_report.json"
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("product_code", "title", "category", "full_price", "currency", "image_path", "split")
TEXT_COLUMNS = ("product_code", "title", "category", "currency", "image_path", "split")


def load_catalog(directory: str | os.PathLike, check_images: bool = True) -> pd.DataFrame:
    """Read ``DIR/catalog.parquet`` and check it against the layout, so a broken dataset fails here with a
    message naming the file, column or row, not later inside a training step.

    Returns the catalog with text columns as ``str`` and ``full_price`` as ``float64``.
    """
    directory = Path(directory)
    path = directory / CATALOG_FILE
    if not path.is_file():
        raise PhivisionError(
            f"{path}: not found (write a dataset with `phivision prepare` or `phivision sample`)"
        )
    try:
        frame = pd.read_parquet(path)
    except Exception as err:
        raise PhivisionError(f"{path}: cannot read parquet: {err}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise PhivisionError(f"{path}: missing column(s) {', '.join(missing)}")
    for column in TEXT_COLUMNS:
        bad = frame[column].map(lambda v: not isinstance(v, str) or not v.strip())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise PhivisionError(
                f"{path} row {row}: column '{column}': empty or not text ({frame[column].iloc[row]!r})"
            )
    try:
        prices = pd.to_numeric(frame["full_price"], errors="raise").astype("float64")
    except (ValueError, TypeError) as err:
        raise PhivisionError(f"{path}: column 'full_price': not numeric ({err})") from None
    bad = ~(prices > 0) | ~prices.map(lambda p: p < float("inf"))
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise PhivisionError(
            f"{path} row {row}: column 'full_price': {prices.iloc[row]!r} is not a positive price"
        )
    frame["full_price"] = prices
    bad = ~frame["split"].isin(SPLITS)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise PhivisionError(
            f"{path} row {row}: column 'split': {frame['split'].iloc[row]!r} is not one of {', '.join(SPLITS)}"
        )
    root = directory.resolve()
    for row, rel in enumerate(frame["image_path"]):
        if Path(rel).is_absolute() or not (root / rel).resolve().is_relative_to(root):
            raise PhivisionError(f"{path} row {row}: column 'image_path': {rel!r} is outside {directory}")
        if check_images and not (directory / rel).is_file():
            raise PhivisionError(f"{path} row {row}: column 'image_path': {directory / rel} not found")
    return frame.reset_index(drop=True)
