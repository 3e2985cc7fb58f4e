"""Catalog datasets: the layout, the one image loader, ``prepare`` (tables of URLs -> dataset), ``sample``,
``inspect`` and :func:`to_hf_dataset`."""

from __future__ import annotations

from phivision.data.hf import to_hf_dataset
from phivision.data.images import DEFAULT_MAX_PIXELS, ImageError, check_image, load_image
from phivision.data.layout import (
    CATALOG_FILE,
    IMAGES_DIR,
    REPORT_FILE,
    REQUIRED_COLUMNS,
    SPLITS,
    load_catalog,
)
from phivision.data.prices import read_price

__all__ = [
    "CATALOG_FILE",
    "DEFAULT_MAX_PIXELS",
    "IMAGES_DIR",
    "REPORT_FILE",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "ImageError",
    "check_image",
    "load_catalog",
    "load_image",
    "read_price",
    "to_hf_dataset",
]
