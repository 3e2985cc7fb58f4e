"""Conflicting duplicates: rows that share a product code (or an image) but disagree on what the product is.

Two rows with the same product code and image but prices 1040 and 5.0 cannot both be right, and a model trained
on both learns neither. The rule, used by ``prepare`` and reported by ``inspect``:

* rows sharing a key (``product_code``; then, among the rows left, the image URL) form a group; rows agree when
  their title (compared as :func:`phivision.data.split.group_key`: case, spacing and punctuation ignored), price
  and currency are equal;
* a group whose rows all agree is no conflict (exact copies are dropped before, as ``duplicate_row``);
* otherwise the version held by a strict majority of the group's rows is kept and every other row is dropped;
  without a strict majority (e.g. one row each) nothing says which is right, so the whole group is dropped. Each
  dropped row gets the reason ``conflicting_duplicate`` and a detail naming the key and the versions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from phivision.data.prices import plain
from phivision.data.split import group_key

COMPARED = ("title", "full_price", "currency")


@dataclass
class ConflictGroup:
    """Rows (frame index labels) sharing ``key`` in ``column`` whose versions differ."""

    column: str
    key: str
    rows: list
    versions: list[tuple[tuple, int]]  # (version, rows holding it), most common first
    kept: list = field(default_factory=list)  # rows the rule keeps (empty: the whole group is dropped)

    def describe(self, limit: int = 4) -> str:
        shown = "; ".join(f"{n} row(s) {_version_text(v)}" for v, n in self.versions[:limit]) + (
            "; ..." if len(self.versions) > limit else ""
        )
        verdict = "kept the majority" if self.kept else "no majority, all dropped"
        return f"{self.column} {self.key!r} has {len(self.versions)} versions: {shown} ({verdict})"

    def as_dict(self) -> dict:
        return {
            "column": self.column,
            "key": self.key,
            "rows": len(self.rows),
            "versions": [{**_version_dict(v), "rows": n} for v, n in self.versions],
            "resolution": "majority kept" if self.kept else "all dropped (no majority)",
        }


def _version(row: pd.Series) -> tuple:
    return (group_key(row["title"]), float(plain(row["full_price"])), str(row["currency"]))


def _version_text(version: tuple) -> str:
    title, price, currency = version
    return f"title ~ {title!r}, price {price:g} {currency}"


def _version_dict(version: tuple) -> dict:
    title, price, currency = version
    return {"title_key": title, "full_price": price, "currency": currency}


def conflict_groups(frame: pd.DataFrame, column: str) -> list[ConflictGroup]:
    """Every group of rows sharing ``frame[column]`` whose versions (title, price, currency) differ, with the rows
    the rule keeps. Rows with an empty key are never grouped."""
    keys = frame[column]
    shared = keys[keys.notna() & keys.duplicated(keep=False)]
    if shared.empty:
        return []
    candidates = frame.loc[shared.index]
    versions = pd.Series(
        [_version(row) for _, row in candidates[list(COMPARED)].iterrows()], index=shared.index
    )
    groups = []
    for key, members in versions.groupby(shared, sort=False):
        counts = Counter(members.tolist())
        if len(counts) < 2:
            continue
        ranked = counts.most_common()
        best, best_rows = ranked[0]
        kept = [i for i, v in members.items() if v == best] if best_rows * 2 > len(members) else []
        groups.append(ConflictGroup(column, str(key), list(members.index), ranked, kept))
    return groups


def resolve_conflicts(
    frame: pd.DataFrame, columns: tuple[str, ...]
) -> tuple[pd.Series, dict, list[ConflictGroup]]:
    """Apply the rule for each column in turn (later columns see only the rows kept so far).

    Returns a boolean Series (True = keep), ``{index: detail}`` for every dropped row, and the groups found.
    """
    keep = pd.Series(True, index=frame.index)
    dropped: dict = {}
    found: list[ConflictGroup] = []
    for column in columns:
        for group in conflict_groups(frame[keep], column):
            found.append(group)
            detail = group.describe()
            for index in group.rows:
                if index not in group.kept:
                    keep[index] = False
                    dropped[index] = detail
    return keep, dropped, found
