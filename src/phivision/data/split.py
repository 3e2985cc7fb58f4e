"""Train/val/test split: stratified by category, and leak-free across product variants.

Catalogs list colour variants as separate products that share a title and a price. If one variant landed in
train and another in test, the test score would measure memorisation, so all rows sharing a (normalised) title
form one group, and whole groups are assigned to splits.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from phivision.args import parse_ratios
from phivision.data.layout import SPLITS


def group_key(title: str) -> str:
    """Titles that differ only in case, spacing or punctuation name the same product."""
    return re.sub(r"[\W_]+", " ", str(title).lower()).strip()


def assign_splits(
    frame: pd.DataFrame,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    group_col: str = "title",
    strat_col: str = "category",
) -> pd.Series:
    """Return a ``split`` Series (train/val/test) aligned with ``frame``.

    Within each category the title groups are shuffled with a seed derived from ``seed`` and the category name
    (so adding a category does not reshuffle the others), then laid end to end: a group goes to the split whose
    share of the category's rows contains the group's midpoint. Small categories therefore fill train first.
    """
    ratios = parse_ratios(ratios)
    bounds = np.cumsum(ratios)
    keys = frame[group_col].map(group_key)
    # a group belongs to the category most of its rows have (ties: alphabetical), so it is counted once
    group_category = (
        pd.DataFrame({"key": keys, "cat": frame[strat_col].astype(str)})
        .groupby(["key", "cat"])
        .size()
        .reset_index(name="n")
        .sort_values(["key", "n", "cat"], ascending=[True, False, True])
        .drop_duplicates("key")
        .set_index("key")["cat"]
    )
    sizes = keys.value_counts()
    assignment: dict[str, str] = {}
    for category, members in group_category.groupby(group_category):
        groups = sorted(members.index)
        rng = np.random.default_rng([seed, zlib.crc32(str(category).encode())])
        order = rng.permutation(len(groups))
        total = float(sum(sizes[g] for g in groups))
        done = 0.0
        for i in order:
            group = groups[i]
            middle = (done + sizes[group] / 2.0) / total
            assignment[group] = SPLITS[min(int(np.searchsorted(bounds, middle, side="right")), 2)]
            done += sizes[group]
    return keys.map(assignment).rename("split")
