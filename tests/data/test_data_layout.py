"""load_catalog: a broken dataset fails at once with a message naming the file, column and row."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from phivision.data import CATALOG_FILE, load_catalog
from phivision.errors import PhivisionError


@pytest.fixture
def dataset(sample_dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(sample_dataset, copy)
    return copy


def rewrite(dataset, change) -> None:
    frame = pd.read_parquet(dataset / CATALOG_FILE)
    change(frame)
    frame.to_parquet(dataset / CATALOG_FILE)


def test_valid_catalog_types(dataset):
    catalog = load_catalog(dataset)
    assert catalog["full_price"].dtype == "float64"
    assert all(isinstance(v, str) for v in catalog["product_code"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("currency"), "missing column(s) currency"),
        (lambda f: f.loc.__setitem__((3, "split"), "dev"), "row 3: column 'split': 'dev' is not one of"),
        (lambda f: f.loc.__setitem__((2, "full_price"), -1.0), "row 2: column 'full_price'"),
        (lambda f: f.loc.__setitem__((1, "title"), " "), "row 1: column 'title': empty"),
        (lambda f: f.loc.__setitem__((4, "image_path"), "../outside.jpg"), "row 4: column 'image_path'"),
        (lambda f: f.loc.__setitem__((5, "image_path"), "images/none.jpg"), "none.jpg not found"),
    ],
)
def test_broken_catalogs_name_the_problem(dataset, change, message):
    rewrite(dataset, change)
    with pytest.raises(PhivisionError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_catalog(dataset)
    assert str(dataset / CATALOG_FILE) in str(info.value)


def test_missing_catalog(tmp_path):
    with pytest.raises(PhivisionError, match="catalog.parquet: not found"):
        load_catalog(tmp_path)
