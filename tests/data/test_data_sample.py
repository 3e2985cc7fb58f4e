"""`phivision sample`: a valid dataset whose images show what decides category and price."""

from __future__ import annotations

import functools
import random
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from phivision.api import prepare
from phivision.data import load_catalog, load_image
from phivision.data.sample import (
    CATEGORIES,
    COLORS,
    MATERIALS,
    NOISE,
    SIZES,
    draw_product,
    price_of,
    write_sample_catalog,
)
from phivision.errors import PhivisionError


def test_sample_dataset_follows_the_layout(sample_dataset):
    catalog = load_catalog(sample_dataset)
    assert len(catalog) == 60
    assert catalog["category"].value_counts().to_dict() == {c: 10 for c in CATEGORIES}
    assert set(catalog["split"]) == {"train", "val", "test"}
    assert catalog["product_code"].is_unique
    assert (catalog["category"] == catalog["category3_code"]).all()
    assert (sample_dataset / "prepare_report.json").is_file()
    sizes = {load_image(sample_dataset / p).size for p in catalog["image_path"]}
    assert len(sizes) >= 8  # varied canvases, so the HD crops vary
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_price_follows_the_visible_attributes(sample_dataset):
    catalog = load_catalog(sample_dataset)
    for row in catalog.itertuples():
        exact = price_of(row.category, row.material, row.size, row.pattern)
        # both prices are rounded to 10, so each side may be off by 5 more
        assert exact * (1 - NOISE) - 10 <= row.full_price <= exact * (1 + NOISE) + 10, row.title
        words = row.title.split()
        assert words[0] == row.size and words[1] == row.color and row.material in words
        assert (row.pattern in words) == (row.pattern != "Plain")
        assert words[-1] == CATEGORIES[row.category][2]


def coverage(image, rgb, tolerance=40) -> float:
    pixels = np.asarray(image, dtype=np.int32)
    return float((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).mean())


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_size_and_material_are_visible(category):
    drawn = {
        s: draw_product(category, "Blue", "Plain", "Canvas", s, (400, 300), random.Random(0)) for s in SIZES
    }
    blue = [coverage(drawn[s], COLORS["Blue"]) for s in ("Small", "Medium", "Large")]
    assert blue[0] < blue[1] < blue[2]
    assert blue[2] > 0.15  # a large product fills much of the canvas
    for material, (_, trim) in MATERIALS.items():
        image = draw_product(category, "Blue", "Plain", material, "Large", (400, 300), random.Random(0))
        if trim is None:
            assert coverage(image, (100, 55, 15), 20) == 0 and coverage(image, (225, 175, 30), 20) == 0
        else:
            assert coverage(image, trim, 20) > 0.01, material


def test_sample_n_24_writes_every_split(tmp_path):
    """``sample --n 24`` once wrote an empty test split without a word (and evaluate then failed)."""
    catalog = load_catalog(write_sample_catalog(tmp_path / "s", n=24, seed=0))
    assert catalog["split"].value_counts().to_dict() == {"train": 17, "val": 6, "test": 1}


def test_deterministic_for_a_seed(tmp_path):
    first = write_sample_catalog(tmp_path / "a", n=12, seed=5)
    second = write_sample_catalog(tmp_path / "b", n=12, seed=5)
    other = write_sample_catalog(tmp_path / "c", n=12, seed=6)
    pd.testing.assert_frame_equal(load_catalog(first), load_catalog(second))
    for path in load_catalog(first)["image_path"]:
        assert (first / path).read_bytes() == (second / path).read_bytes()
    assert not load_catalog(first)["title"].equals(load_catalog(other)["title"])


def test_url_table_round_trips_through_prepare(tmp_path):
    """`sample --urls-out`, served over HTTP, is a table `prepare` turns back into the same catalog."""
    data = tmp_path / "sample"
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(data))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        write_sample_catalog(data, n=18, seed=2, urls_out=tmp_path / "urls.csv", base_url=base)
        assert pd.read_csv(tmp_path / "urls.csv")["full_price"].str.startswith("$").all()
        report = prepare([str(tmp_path / "urls.csv")], tmp_path / "prepared", progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert report["counts"] == {"rows": 18, "kept": 18, "dropped": 0}
    original = load_catalog(data).set_index("product_code")
    prepared = load_catalog(tmp_path / "prepared").set_index("product_code")
    for column in ("title", "category", "full_price", "currency", "color", "pattern", "material", "size"):
        pd.testing.assert_series_equal(
            prepared[column], original.loc[prepared.index, column], check_dtype=False
        )
    for code in prepared.index:
        served = load_image(tmp_path / "prepared" / prepared.loc[code, "image_path"])
        assert served.tobytes() == load_image(data / original.loc[code, "image_path"]).tobytes()


def test_views_spread_the_cues_over_a_products_photos(tmp_path):
    """With views=4 a product has 1 to 4 photos; beyond one, the front hides the trim and shares its silhouette
    with another department, the detail shows the material, and the products are the same as with one view."""
    single = load_catalog(write_sample_catalog(tmp_path / "one", n=48, seed=3))
    out = write_sample_catalog(tmp_path / "many", n=48, seed=3, views=4)
    catalog = load_catalog(out)
    counts = catalog["image_paths"].map(len)
    assert set(counts) == {1, 2, 3, 4}
    assert list(catalog["image_path"]) == [paths[0] for paths in catalog["image_paths"]]
    same = ["product_code", "title", "category", "full_price", "split"]
    pd.testing.assert_frame_equal(catalog[same], single[same])
    for paths in catalog["image_paths"]:
        assert [p.rsplit("/", 1)[-1] for p in paths[1:]] == [
            f"{paths[0].rsplit('/', 1)[-1][:-4]}-{k}.jpg" for k in range(2, len(paths) + 1)
        ]
    # a one-photo product is drawn exactly as without views
    for row in catalog[counts == 1].itertuples():
        assert (out / row.image_path).read_bytes() == (tmp_path / "one" / row.image_path).read_bytes()
    for row in catalog[counts > 1].itertuples():
        front, detail = (load_image(out / p) for p in row.image_paths[:2])
        trim = MATERIALS[row.material][1]
        if trim is not None:
            assert coverage(front, trim, tolerance=30) < 0.01, row.title  # the front hides the trim
            assert coverage(detail, trim, tolerance=30) > 0.15, row.title  # the detail shows it
    # the dataset names its views: another --views is another dataset
    with pytest.raises(PhivisionError, match="holds another dataset"):
        write_sample_catalog(tmp_path / "many", n=48, seed=3, views=2)
    with pytest.raises(PhivisionError, match="--views 5: must be a whole number of photos, at most 4"):
        write_sample_catalog(tmp_path / "bad", n=4, views=5)
