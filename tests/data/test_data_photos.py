"""Several photos per product through `prepare`: a JSON list column, a separated list, repeated image columns,
repeated rows of one product code and a parquet list column, each against the loopback fault server; the
dataset layout read back by `load_catalog` and `to_hf_dataset`, old single-photo datasets included."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
from fault_server import FaultServer, dbq_row, image_bytes

from cli_helpers import run_cli
from phivision.api import prepare
from phivision.data import load_catalog, to_hf_dataset
from phivision.data.photos import cell_urls
from phivision.data.prepare import summary
from phivision.data.sample import write_sample_catalog
from phivision.errors import PhivisionError

COLOURS = {
    "a": (200, 30, 40),
    "b": (30, 200, 40),
    "c": (30, 40, 200),
    "d": (200, 200, 40),
    "e": (90, 20, 120),
    "f": (20, 120, 120),
}


@pytest.fixture
def photos(server: FaultServer) -> FaultServer:
    """Six distinguishable photos a..f, served as `/img/<letter>.jpg`."""
    for name, colour in COLOURS.items():
        server.files[f"{name}.jpg"] = image_bytes(colour, size=(40 + 8 * len(server.files), 32))
    return server


def photo_names(out: Path, server: FaultServer, paths: list[str]) -> list[str]:
    """Which served photo each catalog file is (by its bytes)."""
    by_bytes = {data: name for name, data in server.files.items()}
    return [by_bytes[(out / p).read_bytes()] for p in paths]


def catalog_photos(out: Path, server: FaultServer) -> dict[str, list[str]]:
    catalog = load_catalog(out)
    for first, paths in zip(catalog["image_path"], catalog["image_paths"], strict=True):
        assert first == paths[0]
    return {
        code: photo_names(out, server, paths)
        for code, paths in zip(catalog["product_code"], catalog["image_paths"], strict=True)
    }


def test_json_list_column_keeps_valid_photos_in_order(tmp_path, photos, fast_download):
    u = photos.url
    rows = [
        dbq_row("A1", "Red Tote", "bags", 1290, json.dumps([u("img/b.jpg"), u("404/x.jpg"), u("img/a.jpg")])),
        dbq_row("B2", "Blue Tote", "bags", 990, json.dumps([u("404/y.jpg"), u("html/z.jpg")])),
        dbq_row("C3", "Green Hat", "hats", 90, u("img/c.jpg")),  # a plain URL in the same column
        dbq_row("D4", "Odd Hat", "hats", 95, '["' + u("img/d.jpg") + '", '),  # a broken JSON array
        dbq_row("E5", "Twice Hat", "hats", 99, json.dumps([u("img/e.jpg"), u("img/e.jpg"), None, "N.A."])),
    ]
    source = tmp_path / "shop.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    out = tmp_path / "ds"
    report = prepare(str(source), out, **fast_download, progress=False)

    assert catalog_photos(out, photos) == {"A1": ["b.jpg", "a.jpg"], "C3": ["c.jpg"], "E5": ["e.jpg"]}
    assert report["products"] == 3
    assert report["counts"] == {"rows": 5, "kept": 3, "dropped": 2}
    failed = {d["product_code"]: d for d in report["failed"]}
    assert failed["B2"]["reason"] == "no_valid_image"
    assert failed["B2"]["detail"] == "all 2 photos failed (1 http_404, 1 not_an_image)"
    assert failed["D4"]["reason"] == "malformed_image_list"
    left_out = {(d["product_code"], d["url"]): d["reason"] for d in report["dropped_images"]}
    assert left_out == {
        ("A1", u("404/x.jpg")): "http_404",
        ("B2", u("404/y.jpg")): "http_404",
        ("B2", u("html/z.jpg")): "not_an_image",
        ("D4", '["' + u("img/d.jpg") + '",'): "malformed_image_list",
        ("E5", u("img/e.jpg")): "duplicate_image",
    }
    assert all(
        d["row"] == {"A1": 2, "B2": 3, "D4": 5, "E5": 6}[d["product_code"]] for d in report["dropped_images"]
    )
    assert report["images"]["per_product"] == {"1": 2, "2": 1}
    assert report["images"]["in_catalog"] == 4
    assert report["images"]["left_out_by_reason"] == {
        "http_404": 2,
        "not_an_image": 1,
        "malformed_image_list": 1,
        "duplicate_image": 1,
    }
    assert photos.counts["/img/e.jpg"] == 1  # a repeated photo is fetched once
    text = summary(report)
    assert "Prepared 3 of 5 products" in text and "1 to 2 per product" in text and "5 left out" in text

    # a rerun reuses every photo and gives the same catalog
    before = load_catalog(out)
    again = prepare(str(source), out, **fast_download, progress=False)
    assert (again["images"]["downloaded"], again["images"]["reused"]) == (0, 4)
    pd.testing.assert_frame_equal(load_catalog(out), before)


def test_separated_list_column(tmp_path, photos, fast_download):
    u = photos.url
    rows = [
        dbq_row("A1", "Red Tote", "bags", 1290, f"{u('img/c.jpg')} | {u('img/a.jpg')}|"),
        dbq_row("B2", "Blue Tote", "bags", 990, u("img/b.jpg")),
    ]
    source = tmp_path / "shop.tsv"
    pd.DataFrame(rows).to_csv(source, sep="\t", index=False)
    with pytest.raises(PhivisionError, match="--image-sep ''"):
        prepare(str(source), tmp_path / "no", image_sep="", progress=False)

    out = tmp_path / "ds"
    prepare(str(source), out, image_sep="|", **fast_download, progress=False)
    assert catalog_photos(out, photos) == {"A1": ["c.jpg", "a.jpg"], "B2": ["b.jpg"]}


def test_repeated_image_columns(tmp_path, photos, fast_download):
    u = photos.url
    rows = [
        {**dbq_row("A1", "Red Tote", "bags", 1290, u("img/a.jpg")), "back": u("img/b.jpg"), "detail": ""},
        {**dbq_row("B2", "Blue Tote", "bags", 990, ""), "back": u("img/c.jpg"), "detail": u("img/d.jpg")},
        {**dbq_row("C3", "Grey Hat", "hats", 90, ""), "back": "", "detail": ""},
        {**dbq_row("D4", "Lost Hat", "hats", 90, u("404/d.jpg")), "back": u("500/e.jpg"), "detail": ""},
    ]
    source = tmp_path / "shop.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    with pytest.raises(PhivisionError, match="--image-col back: named more than once"):
        prepare(str(source), tmp_path / "no", image_col=["imageurl", "back", "back"], progress=False)
    with pytest.raises(PhivisionError, match="column 'side' not found"):
        prepare(str(source), tmp_path / "no", image_col=["imageurl", "side"], progress=False)

    out = tmp_path / "ds"
    report = prepare(
        str(source), out, image_col=["imageurl", "back", "detail"], **fast_download, progress=False
    )
    assert catalog_photos(out, photos) == {
        "A1": ["a.jpg", "b.jpg"],
        "B2": ["c.jpg", "d.jpg"],
        "D4": ["e.jpg"],
    }
    assert report["failed"] == [
        {
            "source": str(source),
            "row": 4,
            "product_code": "C3",
            "url": None,
            "reason": "missing_image_url",
            "detail": "",
        }
    ]
    assert [(d["product_code"], d["reason"]) for d in report["dropped_images"]] == [("D4", "http_404")]
    written = json.loads((out / "prepare_report.json").read_text())
    assert written["options"]["columns"]["image_url"] == ["imageurl", "back", "detail"]


def test_rows_of_one_product_code(tmp_path, photos, fast_download):
    """A product repeated once per photo, a shop export's photo-only lines, and the conflict rule inside a code."""
    u = photos.url
    image_line = {k: "" for k in dbq_row("x", "", "", "", "")}
    rows = [
        dbq_row("A1", "Red Tote", "bags", "$1,290.00", u("img/a.jpg")),
        dbq_row("B2", "Blue Tote", "bags", 990, u("img/d.jpg")),
        dbq_row("A1", "Red Tote", "bags", "1290", u("img/c.jpg")),  # the same product, another photo
        {**image_line, "product_code": "A1", "imageurl": u("img/b.jpg")},  # a photo-only line
        {**image_line, "product_code": "A1", "imageurl": u("img/a.jpg")},  # the same photo again
        {**image_line, "product_code": "Z9", "imageurl": u("img/e.jpg")},  # a photo of no product
        dbq_row("B2", "Blue Tote", "bags", 990, u("404/b2.jpg")),
        # three rows of one code, two agree: the odd one is dropped with its photo
        dbq_row("C3", "Wool Scarf", "scarves", 450, u("img/e.jpg")),
        dbq_row("C3", "Wool Scarf", "scarves", 45, u("img/b.jpg")),
        dbq_row("C3", "wool scarf", "scarves", 450, u("img/f.jpg")),
        # every photo of a product fails: each of its rows is listed as dropped
        dbq_row("D4", "Lost Hat", "hats", 90, u("404/d1.jpg")),
        dbq_row("D4", "Lost Hat", "hats", 90, u("empty/d2.jpg")),
    ]
    source = tmp_path / "shop.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    out = tmp_path / "ds"
    report = prepare(str(source), out, group_by_code=True, **fast_download, progress=False)

    assert catalog_photos(out, photos) == {
        "A1": ["a.jpg", "c.jpg", "b.jpg"],
        "B2": ["d.jpg"],
        "C3": ["e.jpg", "f.jpg"],
    }
    catalog = load_catalog(out).set_index("product_code")
    assert catalog.loc["A1", "full_price"] == 1290.0 and catalog.loc["A1", "title"] == "Red Tote"
    assert report["products"] == 3
    assert report["counts"] == {"rows": 12, "kept": 8, "dropped": 4}
    failed = [(d["row"], d["product_code"], d["reason"]) for d in report["failed"]]
    assert failed == [
        (7, "Z9", "image_row_without_product"),
        (10, "C3", "conflicting_duplicate"),
        (12, "D4", "no_valid_image"),
        (13, "D4", "no_valid_image"),
    ]
    left_out = [(d["row"], d["product_code"], d["reason"]) for d in report["dropped_images"]]
    assert left_out == [
        (6, "A1", "duplicate_image"),
        (8, "B2", "http_404"),
        (12, "D4", "http_404"),
        (13, "D4", "empty"),
    ]
    assert report["sources"][0]["kept"] == 8
    assert "Prepared 3 products from 8 of 12 rows" in summary(report)


def test_parquet_list_column(tmp_path, photos, fast_download):
    u = photos.url
    frame = pd.DataFrame(
        [
            dbq_row("A1", "Red Tote", "bags", 1290.0, [u("img/d.jpg"), u("img/b.jpg")]),
            dbq_row("B2", "Blue Tote", "bags", 990.0, []),
        ]
    )
    source = tmp_path / "shop.parquet"
    frame.to_parquet(source)
    out = tmp_path / "ds"
    report = prepare(str(source), out, **fast_download, progress=False)
    assert catalog_photos(out, photos) == {"A1": ["d.jpg", "b.jpg"]}
    assert report["failed"][0]["reason"] == "missing_image_url"
    catalog = load_catalog(out)
    assert [list(v) for v in catalog["imageurl"]] == [
        [u("img/d.jpg"), u("img/b.jpg")]
    ]  # the source column, kept


def test_cell_urls_reads_each_list_form():
    assert cell_urls('["a.jpg", "b.jpg"]', None) == (["a.jpg", "b.jpg"], None)
    assert cell_urls("a.jpg; b.jpg;", ";") == (["a.jpg", "b.jpg"], None)
    assert cell_urls("a.jpg;b.jpg", None) == (["a.jpg;b.jpg"], None)
    assert cell_urls(["a.jpg", None, " "], None) == (["a.jpg"], None)
    assert cell_urls("N.A.", "|") == ([], None)
    assert cell_urls('["a.jpg"', None) == ([], "not a JSON array of URLs")
    assert cell_urls('[{"src": "a.jpg"}]', None) == ([], "a JSON array of URLs holds dict items")


def test_old_single_photo_datasets_read_unchanged(sample_dataset, tmp_path):
    """A catalog written before `image_paths` existed reads as one photo per product, in every reader."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "images").symlink_to(sample_dataset / "images")
    frame = pd.read_parquet(sample_dataset / "catalog.parquet").drop(columns=["image_paths"])
    frame.to_parquet(old / "catalog.parquet")
    catalog = load_catalog(old)
    assert [list(p) for p in catalog["image_paths"]] == [[p] for p in catalog["image_path"]]
    ds = to_hf_dataset(old)
    assert isinstance(ds["train"].features["images"], (datasets.Sequence, datasets.List))
    first = ds["train"][0]
    assert len(first["images"]) == 1 and first["images"][0].size == first["image"].size


def test_layout_checks_image_paths(sample_dataset, tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "images").symlink_to(sample_dataset / "images")
    frame = pd.read_parquet(sample_dataset / "catalog.parquet")
    first = frame.at[0, "image_path"]
    cases = [
        ([first, "images/nope.jpg"], "row 2: column 'image_paths' item 2: .*nope.jpg not found"),
        ([first, "../x.jpg"], r"row 2: column 'image_paths' item 2: '../x.jpg' leaves the directory"),
        ([], "row 2: column 'image_paths': expected a non-empty list"),
        (["images/other.jpg"], "row 2: column 'image_path': .* is not the first photo of 'image_paths'"),
    ]
    for paths, message in cases:
        broken = frame.copy()
        broken["image_paths"] = [paths] + [list(p) for p in frame["image_paths"][1:]]
        broken.to_parquet(out / "catalog.parquet")
        with pytest.raises(PhivisionError, match=message):
            load_catalog(out)
    # image_paths alone is enough: image_path is its first item
    frame.drop(columns=["image_path"]).to_parquet(out / "catalog.parquet")
    assert list(load_catalog(out)["image_path"]) == list(frame["image_path"])


def test_the_command_line_takes_every_form(tmp_path, photos, capsys):
    """Repeated --image-col, --image-sep and --group-by-code on `phivision prepare`, and their one-line errors."""
    u = photos.url
    rows = [
        {
            **dbq_row("A1", "Red Tote", "bags", 1290, f"{u('img/a.jpg')}|{u('img/b.jpg')}"),
            "detail": u("img/c.jpg"),
        },
        {**dbq_row("A1", "Red Tote", "bags", 1290, u("img/d.jpg")), "detail": ""},
        {**dbq_row("B2", "Blue Hat", "hats", 90, u("img/e.jpg")), "detail": ""},
    ]
    source = tmp_path / "shop.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    out = tmp_path / "ds"
    flags = ["--image-col", "imageurl", "--image-col", "detail", "--image-sep", "|", "--group-by-code"]
    code, _, err = run_cli(
        capsys, "prepare", "--source", str(source), "--out", str(out), *flags, "--retries", "0"
    )
    assert code == 0, err
    assert catalog_photos(out, photos) == {"A1": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "B2": ["e.jpg"]}
    assert "Prepared 2 products from 3 of 3 rows" in err + _

    code, _, err = run_cli(
        capsys,
        "prepare",
        "--source",
        str(source),
        "--out",
        str(tmp_path / "x"),
        "--image-col",
        "detail",
        "--image-col",
        "detail",
    )
    assert code == 2 and err.strip() == "error: --image-col detail: named more than once"
    code, _, err = run_cli(
        capsys, "prepare", "--source", str(source), "--out", str(tmp_path / "x"), "--image-sep", ""
    )
    assert code == 2 and err.strip().startswith("error: --image-sep ''")


def test_a_catalog_with_several_photos_prepared_again(tmp_path):
    """A phivision catalog as the source (its `image_paths` list column as the image column, local files): the
    new catalog's columns replace the source's, and every product keeps its photos in order."""
    first = write_sample_catalog(tmp_path / "first", n=12, seed=0, views=4)
    table = pd.read_parquet(first / "catalog.parquet")
    table["image_paths"] = [[str(first / p) for p in paths] for paths in table["image_paths"]]
    table.to_parquet(tmp_path / "table.parquet")
    columns = dict(category_col="category", price_col="full_price", currency_col="currency")
    out = tmp_path / "again"
    report = prepare(
        str(tmp_path / "table.parquet"),
        out,
        image_col="image_paths",
        allow_local=True,
        progress=False,
        **columns,
    )
    assert report["counts"]["kept"] == 12
    before, after = load_catalog(first), load_catalog(out)
    counts = {
        code: len(paths) for code, paths in zip(before["product_code"], before["image_paths"], strict=True)
    }
    assert {c: len(p) for c, p in zip(after["product_code"], after["image_paths"], strict=True)} == counts
    assert max(counts.values()) > 1
    for code, paths in zip(after["product_code"], after["image_paths"], strict=True):
        source = before.loc[before["product_code"] == code, "image_paths"].iloc[0]
        assert [(out / p).read_bytes() for p in paths] == [(first / p).read_bytes() for p in source]
