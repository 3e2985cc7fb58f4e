"""The label space a run was trained on: the training split's categories and the catalog's currency.

Training writes it to ``RUN/labels.json``, an export carries it in ``phivision.json`` under ``labels``, and
:func:`phivision.runs.load_model` hands it on (``LoadedModel.categories``, ``LoadedModel.currency``), so
constrained generation can keep the category inside the taxonomy and every answer can name its currency.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError
from phivision.io import atomic_write_json


@dataclass(frozen=True)
class LabelSpace:
    """Categories an answer may name (sorted, None: unknown) and the currency of its prices (None: unknown)."""

    categories: tuple[str, ...] | None = None
    currency: str | None = None

    def __post_init__(self) -> None:
        if self.categories is not None:
            if not self.categories or not all(isinstance(c, str) and c.strip() for c in self.categories):
                raise ValueError("categories must be a non-empty list of non-empty strings")
            object.__setattr__(self, "categories", tuple(sorted(set(self.categories))))
        if self.currency is not None and (not isinstance(self.currency, str) or not self.currency.strip()):
            raise ValueError(f"currency must be non-empty text, got {self.currency!r}")

    @classmethod
    def from_rows(cls, categories: Iterable[Any], currencies: Iterable[Any]) -> LabelSpace:
        """From a split's ``category`` and ``currency`` columns. A catalog that mixes currencies has no single
        currency to report, so ``currency`` is None rather than a guess."""
        cats = sorted({str(c) for c in categories if isinstance(c, str) and c.strip()})
        found = {str(c).strip() for c in currencies if isinstance(c, str) and c.strip()}
        return cls(tuple(cats) or None, found.pop() if len(found) == 1 else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "categories": list(self.categories) if self.categories is not None else None,
            "currency": self.currency,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LabelSpace:
        if not isinstance(data, dict):
            raise ValueError(
                f"expected an object with 'categories' and 'currency', got {type(data).__name__}"
            )
        unknown = set(data) - {"categories", "currency"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        categories = data.get("categories")
        if categories is not None and not isinstance(categories, list):
            raise ValueError("'categories' must be a list of strings")
        return cls(tuple(categories) if categories is not None else None, data.get("currency"))


def write_labels(run_dir: str | os.PathLike, labels: LabelSpace) -> Path:
    """Write ``RUN/labels.json`` atomically."""
    path = RunLayout(run_dir).labels
    atomic_write_json(path, labels.to_dict())
    return path


def read_labels(run_dir: str | os.PathLike) -> LabelSpace:
    """``RUN/labels.json``, or an empty LabelSpace for a run trained before labels were recorded."""
    path = RunLayout(run_dir).labels
    if not path.is_file():
        return LabelSpace()
    try:
        return LabelSpace.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as err:
        raise PhivisionError(f"{path}: {err}") from err
