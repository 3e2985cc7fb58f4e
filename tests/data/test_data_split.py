"""Splits are stratified by category, deterministic, and keep title-sharing variants together."""

from __future__ import annotations

import pandas as pd
import pytest

from phivision.args import parse_ratios
from phivision.data.split import assign_splits, group_key
from phivision.errors import PhivisionError


def catalog(n_per_category: int = 50, variants: int = 3) -> pd.DataFrame:
    rows = []
    for category in ("bags", "shoes", "hats"):
        for i in range(n_per_category):
            for v in range(variants):  # colour variants: one title, several product codes
                rows.append(
                    {
                        "product_code": f"{category}-{i}-{v}",
                        "title": f"{category} model {i}",
                        "category": category,
                    }
                )
    return pd.DataFrame(rows)


def test_stratified_and_close_to_the_ratios():
    frame = catalog()
    split = assign_splits(frame, (0.8, 0.1, 0.1), seed=0)
    for category, members in split.groupby(frame["category"]):
        shares = members.value_counts(normalize=True)
        assert shares["train"] == pytest.approx(0.8, abs=0.03), category
        assert shares["val"] == pytest.approx(0.1, abs=0.03), category
        assert shares["test"] == pytest.approx(0.1, abs=0.03), category


def test_variants_sharing_a_title_never_straddle_splits():
    frame = catalog()
    frame.loc[frame.index % 3 == 1, "title"] = frame["title"].str.upper() + "  "  # same name, other spelling
    split = assign_splits(frame, seed=3)
    per_title = split.groupby(frame["title"].map(group_key)).nunique()
    assert (per_title == 1).all()


def test_deterministic_for_a_seed_and_independent_of_row_order():
    frame = catalog(20, 1)
    first = assign_splits(frame, seed=7)
    shuffled = frame.sample(frac=1.0, random_state=1)
    assert assign_splits(shuffled, seed=7).sort_index().equals(first)
    assert not assign_splits(frame, seed=8).equals(first)


def test_small_categories_fill_train_first_and_zero_ratios_are_respected():
    frame = pd.DataFrame({"title": ["a", "b"], "category": ["rare", "rare"]})
    assert list(assign_splits(frame, (0.8, 0.1, 0.1))) == ["train", "train"]
    big = catalog(30, 1)
    assert set(assign_splits(big, (0.9, 0.0, 0.1))) == {"train", "test"}


def test_parse_ratios():
    assert parse_ratios("80,10,10") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_ratios([1, 1, 0]) == (0.5, 0.5, 0.0)
    for bad in ("0.8,0.2", "a,b,c", "0,1,1", "1,-1,1"):
        with pytest.raises(PhivisionError, match="--split"):
            parse_ratios(bad)
