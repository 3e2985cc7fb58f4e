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
        # rows as a spreadsheet shows the catalog: the header is row 1, so the product at index 3 is row 5
        (lambda f: f.loc.__setitem__((3, "split"), "dev"), "row 5: column 'split': 'dev' is not one of"),
        (
            lambda f: f.loc.__setitem__((2, "full_price"), -3.0),
            "row 4: column 'full_price': -3.0 is not a positive",
        ),
        (
            lambda f: f.loc.__setitem__((0, "full_price"), 0.0),
            "row 2: column 'full_price': 0.0 is not a positive",
        ),
        (lambda f: f.loc.__setitem__((1, "title"), " "), "row 3: column 'title': empty"),
        (lambda f: f.__setitem__("title", 7.5), "row 2: column 'title': empty or not text (7.5)"),
        (lambda f: f.loc.__setitem__((4, "image_path"), "../outside.jpg"), "row 6: column 'image_path'"),
        (lambda f: f.loc.__setitem__((5, "image_path"), "images/none.jpg"), "row 7: column 'image_path': "),
    ],
)
def test_broken_catalogs_name_the_problem(dataset, change, message):
    rewrite(dataset, change)
    with pytest.raises(PhivisionError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_catalog(dataset)
    assert str(dataset / CATALOG_FILE) in str(info.value)
    assert "np." not in str(info.value)  # plain values, never a numpy repr such as np.float64(-3.0)


def test_missing_catalog(tmp_path):
    with pytest.raises(PhivisionError, match="catalog.parquet: not found"):
        load_catalog(tmp_path)
