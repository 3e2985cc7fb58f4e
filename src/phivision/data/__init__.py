"""Catalog datasets: the layout, the one image loader, ``prepare`` (tables of URLs -> dataset), ``sample``,
``inspect`` and :func:`to_hf_dataset`.

Names are imported on first use, so ``import phivision.data`` (and the CLI's ``--help``, which reads
:mod:`phivision.data.defaults`) loads neither pandas nor Pillow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_MAX_PIXELS": "phivision.data.images",
    "ImageError": "phivision.data.images",
    "check_image": "phivision.data.images",
    "load_image": "phivision.data.images",
    "CATALOG_FILE": "phivision.data.layout",
    "IMAGES_DIR": "phivision.data.layout",
    "REPORT_FILE": "phivision.data.layout",
    "REQUIRED_COLUMNS": "phivision.data.layout",
    "SPLITS": "phivision.data.layout",
    "load_catalog": "phivision.data.layout",
    "to_hf_dataset": "phivision.data.hf",
    "read_price": "phivision.data.prices",
    "write_sample_catalog": "phivision.data.sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'phivision.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
