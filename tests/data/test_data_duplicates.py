"""Conflicting duplicates: reported, resolved by the documented rule, a reason for every dropped row."""

from __future__ import annotations

import pandas as pd
from fault_server import dbq_row, image_bytes

from phivision.api import prepare
from phivision.data import load_catalog
from phivision.data.duplicates import conflict_groups


def test_conflicting_duplicates_follow_the_majority_rule(tmp_path):
    for name, color in (
        ("a", (200, 0, 0)),
        ("b", (0, 200, 0)),
        ("c", (0, 0, 200)),
        ("d", (90, 90, 0)),
        ("e", (0, 90, 90)),
    ):
        (tmp_path / f"{name}.jpg").write_bytes(image_bytes(color))
    img = lambda name: str(tmp_path / f"{name}.jpg")  # noqa: E731
    rows = [
        # the case: one code, one image, prices 1040 and 5.0: no majority, both dropped
        dbq_row("A1", "Check Shirt", "shirts", "1040", img("a")),
        dbq_row("A1", "Check Shirt", "shirts", "5.0", img("a")),
        # three rows of one code, two agree: the majority is kept (two rows, two images), the odd one dropped
        dbq_row("B2", "Wool Scarf", "scarves", "450", img("b")),
        dbq_row("B2", "wool scarf", "scarves", "450", img("e")),  # same title after normalisation
        dbq_row("B2", "Wool Scarf", "scarves", "45", img("b")),
        # one image, two products with different titles: no majority, both dropped
        dbq_row("C3", "Red Cap", "hats", "90", img("d")),
        dbq_row("C4", "Blue Cap", "hats", "90", img("d")),
        # an exact copy is a duplicate_row, not a conflict
        dbq_row("E5", "Plain Tote", "bags", "300", img("c")),
        dbq_row("E5", "Plain Tote", "bags", "300", img("c")),
        # variants sharing one photo and the same label are no conflict
        dbq_row("F6", "Plain Tote", "bags", "300", img("c")),
    ]
    source = tmp_path / "c.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    report = prepare(str(source), tmp_path / "ds", allow_local=True, progress=False)

    assert report["counts"] == {"rows": 10, "kept": 4, "dropped": 6}
    assert report["dropped_by_reason"] == {"conflicting_duplicate": 5, "duplicate_row": 1}
    conflicts = report["conflicts"]
    assert conflicts["product_code"] == {"groups": 2, "rows": 5, "dropped": 3}
    assert conflicts["image_url"] == {"groups": 1, "rows": 2, "dropped": 2}
    assert "strict majority" in conflicts["rule"]
    dropped = {(d["product_code"], d["row"]): d for d in report["failed"]}
    assert set(dropped) == {("A1", 2), ("A1", 3), ("B2", 6), ("C3", 7), ("C4", 8), ("E5", 10)}
    assert "no majority" in dropped[("A1", 2)]["detail"] and "1040" in dropped[("A1", 2)]["detail"]
    assert "kept the majority" in dropped[("B2", 6)]["detail"]
    catalog = load_catalog(tmp_path / "ds")
    assert sorted(zip(catalog["product_code"], catalog["full_price"], strict=True)) == [
        ("B2", 450.0),
        ("B2", 450.0),
        ("E5", 300.0),
        ("F6", 300.0),
    ]


def test_conflict_groups_on_a_catalog():
    frame = pd.DataFrame(
        {
            "product_code": ["X", "X", "Y", "Z"],
            "title": ["T", "T", "U", "V"],
            "full_price": [10.0, 12.0, 5.0, 5.0],
            "currency": ["USD"] * 4,
        }
    )
    groups = conflict_groups(frame, "product_code")
    assert len(groups) == 1 and groups[0].key == "X" and groups[0].kept == []
    assert groups[0].as_dict()["resolution"] == "all dropped (no majority)"
