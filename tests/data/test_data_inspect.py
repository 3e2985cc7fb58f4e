"""`phivision inspect`: exact findings on a hand-made dataset, the page in headless Chromium, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from catalog_helpers import jpeg, photo
from PIL import Image, ImageStat

from cli_helpers import run_cli
from phivision.api import inspect
from phivision.data.inspection import perceptual_hash
from phivision.errors import PhivisionError
from phivision.io import atomic_write_parquet

CHROMIUM = "/usr/bin/chromium"


def product(i, title, category, price, split, image, currency="USD", code=None):
    return {
        "product_code": code or f"C{i:03d}",
        "title": title,
        "category": category,
        "full_price": float(price),
        "currency": currency,
        "image_path": f"images/{image}",
        "split": split,
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """40 products with known problems: 3 near-duplicate pairs across splits (a resized copy, a recompressed
    copy, one file used twice), one pair inside train (not leakage), a conflicting product code, a placeholder
    image under three titles, a flat image, a price outlier, a tiny image, an unreadable file."""
    root = tmp_path_factory.mktemp("inspect") / "ds"
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    splits = (["train"] * 7 + ["val", "test"]) * 4
    for i in range(30):
        category = ["bags", "bags", "shoes", "hats"][i % 4]
        size = (300 + 10 * (i % 7), 240 + 20 * (i % 5))
        (images / f"p{i}.jpg").write_bytes(jpeg(photo(i, size)))
        price = {"bags": 900, "shoes": 500, "hats": 200}[category] * (1 + (i % 5) / 10)
        rows.append(product(i, f"Item {i} {category}", category, price, splits[i], f"p{i}.jpg"))
    # near-duplicates across splits
    (images / "p0-small.jpg").write_bytes(jpeg(photo(0, (300, 240)).resize((150, 120))))
    rows.append(product(30, "Copy A", "bags", 950, "test", "p0-small.jpg"))  # p0 is train
    (images / "p1-lowq.jpg").write_bytes(jpeg(photo(1, (310, 260)), quality=40))
    rows.append(product(31, "Copy B", "bags", 960, "val", "p1-lowq.jpg"))  # p1 is train
    rows.append(product(32, "Copy C", "bags", 970, "test", "p2.jpg"))  # the same file as p2 (train)
    # a near-duplicate inside train: not leakage
    (images / "p3-small.jpg").write_bytes(jpeg(photo(3, (330, 300)).resize((200, 180))))
    rows.append(product(33, "Copy D", "bags", 980, "train", "p3-small.jpg"))
    # a conflicting duplicate: the same product code, another price
    rows.append(product(34, "Item 4 bags", "bags", 5.0, "train", "p4.jpg", code="C004"))
    # a placeholder: one image for three products with different titles (a flat grey picture)
    Image.new("RGB", (400, 400), (200, 200, 200)).save(images / "none.jpg")
    for k in range(3):
        rows.append(product(35 + k, f"Unknown thing {k}", "shoes", 500 + k, "train", "none.jpg"))
    # a price outlier, a tiny image, an unreadable file
    (images / "tiny.jpg").write_bytes(jpeg(photo(99, (40, 30))))
    rows.append(product(38, "Diamond Shoe", "shoes", 500_000, "train", "tiny.jpg"))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append(product(39, "Broken Hat", "hats", 210, "train", "broken.jpg"))
    atomic_write_parquet(root / "catalog.parquet", pd.DataFrame(rows))
    return root


@pytest.fixture(scope="module")
def inspected(dataset):
    return inspect(dataset, progress=False)


def test_findings_are_exact(dataset, inspected):
    r = inspected
    assert r["rows"] == 40
    assert r["splits"]["totals"] == {"train": 31, "val": 4, "test": 5}
    assert r["splits"]["by_category"]["hats"] == {"train": 7, "val": 1, "test": 0}
    near = r["near_duplicates"]
    assert near["pairs"] == 3 and near["by_splits"] == {"train/test": 2, "train/val": 1}
    assert sorted(tuple(e["rows"]) for e in near["examples"]) == [(2, 32), (3, 33), (4, 34)]
    assert [e["same_file"] for e in sorted(near["examples"], key=lambda e: e["rows"])] == [False, False, True]
    # C004 by code; by file: p4.jpg (prices 1260 and 5), p2.jpg (two titles), the placeholder (three titles)
    assert r["conflicts"]["groups"] == 4
    assert r["conflicts"]["by_key"] == {"product_code": 1, "image_file": 3}
    placeholders = r["placeholders"]
    assert placeholders["shared_images"] == 1 and placeholders["rows_on_shared_images"] == 3
    assert placeholders["shared_examples"][0]["row_numbers"] == [37, 38, 39]
    assert placeholders["flat_images"] == 1
    outliers = r["outliers"]
    assert outliers["price"] == 2  # 500,000 among shoes, 5.0 among bags
    assert {o["row"] for o in outliers["price_examples"]} == {36, 40}
    assert outliers["tiny_images"] == 1 and outliers["unreadable"] == 1
    assert outliers["unreadable_examples"] == [
        {"row": 41, "image_path": "images/broken.jpg", "reason": "truncated"}
    ]
    assert r["images"]["files"] == 36 and r["images"]["readable"] == 35
    assert r["balance"]["shares"] == {"bags": 0.525, "shoes": 0.275, "hats": 0.2}
    assert r["prices"]["shoes"]["USD"]["max"] == 500000.0
    on_disk = json.loads((dataset / "inspect.json").read_text())
    assert on_disk["near_duplicates"]["pairs"] == 3


def test_token_costs_use_the_models_geometry(dataset, inspected):
    from phivision.model.image_processing_phi3_v import Phi3VImageProcessor

    tokens = inspected["tokens"]
    assert [row["num_crops"] for row in tokens["by_num_crops"]] == [1, 4, 8, 16]
    one = tokens["by_num_crops"][0]
    # one crop: a 1x1 grid whatever the image, (1 + 1) * 144 + 1 + 2 * 12 = 313 tokens
    assert one["min"] == one["max"] == 313
    assert one["train_epoch"] == 313 * 30  # 31 train rows, one unreadable
    catalog = pd.read_parquet(dataset / "catalog.parquet")
    train = [p for p, s in zip(catalog["image_path"], catalog["split"], strict=True) if s == "train"]
    sizes = [Image.open(dataset / p).size for p in train if not p.endswith("broken.jpg")]
    processor = Phi3VImageProcessor(num_crops=16)
    expected = [processor.calc_num_image_tokens(w, h) for w, h in sizes]
    sixteen = tokens["by_num_crops"][-1]
    assert sixteen["train_epoch"] == sum(expected) and sixteen["max"] >= max(expected)
    assert sixteen["mean"] > tokens["by_num_crops"][1]["mean"] > one["mean"]


def test_perceptual_hash_survives_resizing_not_content():
    a = np.asarray(photo(5, (400, 300)).convert("L").resize((32, 32)), dtype=float)
    b = np.asarray(photo(5, (400, 300)).resize((120, 90)).convert("L").resize((32, 32)), dtype=float)
    c = np.asarray(photo(6, (400, 300)).convert("L").resize((32, 32)), dtype=float)
    assert bin(perceptual_hash(a) ^ perceptual_hash(b)).count("1") <= 4
    assert bin(perceptual_hash(a) ^ perceptual_hash(c)).count("1") >= 16


def test_page_opens_in_chromium_offline(dataset, inspected, tmp_path):
    # Fails (never skips) when the browser is missing: scripts/test.sh installs Debian's chromium.
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} not found: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    page_path = Path(inspected["files"]["html"])
    problems, requests = [], []
    shot = tmp_path / "inspect.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
            sections = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.id)")
            token_rows = page.evaluate("document.querySelectorAll('#token-table tbody tr').length")
            price_axis = page.evaluate("document.querySelector('#prices + figure img').alt")
            text = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    # plots (splits, one price plot, sizes) and thumbnails (3 pairs x 2, 1 placeholder), all decoded
    assert len(images) == 3 + 6 + 1 and all(images)
    assert sections == [
        "splits",
        "prices",
        "images",
        "tokens",
        "near-duplicates",
        "variants",
        "conflicts",
        "placeholders",
        "outliers",
        "balance",
    ]
    assert token_rows == 4 and price_axis == "price per category in USD"
    assert "3 pair(s) of rows in different splits" in text
    image = Image.open(shot).convert("L")
    assert image.height > 900 and ImageStat.Stat(image).stddev[0] > 10


def test_cli_inspect_and_its_bad_flags(dataset, tmp_path, capsys):
    out = tmp_path / "page.html"
    code, stdout, stderr = run_cli(
        capsys, "inspect", str(dataset), "--out", str(out), "--num-crops", "4", "--no-progress"
    )
    assert code == 0, stderr
    assert f"wrote {out} and {tmp_path / 'page.json'}" in stdout
    assert json.loads((tmp_path / "page.json").read_text())["tokens"]["by_num_crops"][0]["num_crops"] == 4
    for args, message in (
        ((str(dataset), "--num-crops", "0"), "--num-crops '0': every value must be at least 1"),
        ((str(dataset), "--num-crops", "4,x"), "--num-crops '4,x': expected whole numbers"),
        ((str(dataset), "--crop-size", "0"), "--crop-size 0: must be a whole number, at least 1"),
        ((str(tmp_path / "none"),), "catalog.parquet: not found"),
    ):
        code, _, stderr = run_cli(capsys, "inspect", *args, "--no-progress")
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith("error: ") and message in stderr


def test_inspect_rejects_bad_arguments(dataset):
    with pytest.raises(PhivisionError, match="--near-duplicate-bits 99"):
        inspect(dataset, near_duplicate_bits=99, progress=False)


def test_photos_per_product_and_tokens_for_each_max_images(tmp_path):
    """A multi-view catalog: the photo counts, an unreadable later photo, and image tokens per sample for each
    max_images that equal what training counts for the same photos."""
    from phivision.answer.prompt import PromptFormat
    from phivision.data import load_catalog
    from phivision.data.sample import write_sample_catalog
    from phivision.model.image_processing_phi3_v import Phi3VImageProcessor
    from phivision.model.processing_phi3_v import Phi3VProcessor
    from phivision.tiny_tokenizer import build_tiny_tokenizer
    from phivision.train.data import ProductDataset, split_rows

    data = write_sample_catalog(tmp_path / "views", n=30, seed=1, views=4)
    catalog = load_catalog(data)
    broken = next(i for i, paths in enumerate(catalog["image_paths"]) if len(paths) >= 3)
    (data / catalog.at[broken, "image_paths"][2]).write_bytes(b"not a photo")
    found = inspect(data, num_crops="1,4", crop_size=56, num_img_tokens=4, progress=False)

    counts = catalog["image_paths"].map(len).value_counts()
    assert found["photos"]["per_product"] == {str(k): int(counts[k]) for k in sorted(counts.index)}
    assert found["photos"]["photos"] == int(catalog["image_paths"].map(len).sum())
    assert found["photos"]["unreadable"] == 1
    assert found["photos"]["unreadable_examples"][0]["row"] == broken + 2
    assert found["photos"]["unreadable_examples"][0]["photo"] == 3
    assert found["images"]["files"] == found["photos"]["photos"]

    table = {(r["max_images"], r["num_crops"]): r for r in found["tokens"]["by_max_images"]}
    assert set(table) == {(m, n) for m in (1, 2, 3, 4) for n in (1, 4)}
    for (m, n), row in table.items():
        processor = Phi3VProcessor(
            Phi3VImageProcessor(num_crops=n, crop_size=56, num_img_tokens=4), build_tiny_tokenizer()
        )
        train = ProductDataset(data, split_rows(catalog, "train"), processor, PromptFormat(), max_images=m)
        assert row["train_epoch"] == sum(train.image_tokens(i) for i in range(len(train))), (m, n)
    for n in (1, 4):  # one photo per prompt is the first-photo table
        first = next(r for r in found["tokens"]["by_num_crops"] if r["num_crops"] == n)
        assert {k: v for k, v in table[1, n].items() if k not in ("max_images",)} == first
        assert table[4, n]["mean"] > table[1, n]["mean"]
    page = (data / "inspect.html").read_text()
    assert 'id="photo-table"' in page and 'id="max-images-table"' in page
