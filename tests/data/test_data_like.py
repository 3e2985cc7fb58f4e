"""`sample --like DIR`: a synthetic catalog with the structure and variability of a prepared one, and none of
its titles or images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from catalog_helpers import write_real_like_table

from phivision.api import prepare, sample
from phivision.data import load_catalog
from phivision.data.inspection import hamming, image_facts
from phivision.data.split import group_key
from phivision.errors import PhivisionError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    source = write_real_like_table(root, n=240, seed=3)
    prepare(str(source), root / "ds", allow_local=True, progress=False)
    return root / "ds"


def test_sample_like_copies_the_shape_not_the_content(prepared, tmp_path):
    real = load_catalog(prepared)
    out = sample(tmp_path / "like", like=prepared, seed=1)
    fake = load_catalog(out)
    assert len(fake) == len(real)  # n defaults to the dataset's size
    assert set(fake["image_paths"].map(len)) == {1}  # one photo per product, as the real catalog has

    real_share = real["category"].value_counts(normalize=True)
    fake_share = fake["category"].value_counts(normalize=True)
    assert set(fake_share.index) == set(real_share.index)
    for category in real_share.index:
        assert abs(fake_share[category] - real_share[category]) <= 0.02, category
        real_median = real.loc[real["category"] == category, "full_price"].median()
        fake_median = fake.loc[fake["category"] == category, "full_price"].median()
        assert abs(fake_median / real_median - 1) <= 0.10, category
    assert set(fake["currency"]) == {"USD"}
    assert (fake["full_price"] % 10 == 0).all()  # the real prices' step (all multiples of 10)

    real_split = real["split"].value_counts(normalize=True)
    fake_split = fake["split"].value_counts(normalize=True)
    for split in ("train", "val", "test"):
        assert abs(fake_split.get(split, 0) - real_split.get(split, 0)) <= 0.05

    words = lambda frame: frame["title"].str.split().str.len()  # noqa: E731
    assert abs(words(fake).mean() - words(real).mean()) <= 0.5
    real_vocabulary = {w.lower() for t in real["title"] for w in t.split()}
    fake_vocabulary = {w.lower() for t in fake["title"] for w in t.split()}
    assert not real_vocabulary & fake_vocabulary  # not even a word is copied
    assert not set(fake["title"].map(group_key)) & set(real["title"].map(group_key))
    assert fake["title"].duplicated().any()  # colour variants exist, as in the real catalog

    real_facts = [image_facts(prepared / p) for p in real["image_path"]]
    fake_facts = [image_facts(out / p) for p in fake["image_path"]]
    assert not {f.sha256 for f in real_facts} & {f.sha256 for f in fake_facts}
    real_hashes = np.array([f.phash for f in real_facts], dtype=np.uint64)
    fake_hashes = np.array([f.phash for f in fake_facts], dtype=np.uint64)
    assert hamming(fake_hashes[:, None], real_hashes[None, :]).min() > 6  # not even a near copy
    real_width = np.median([f.width for f in real_facts])
    fake_width = np.median([f.width for f in fake_facts])
    assert abs(fake_width / real_width - 1) <= 0.10
    real_aspect = np.median([f.width / f.height for f in real_facts])
    fake_aspect = np.median([f.width / f.height for f in fake_facts])
    assert abs(fake_aspect / real_aspect - 1) <= 0.15

    report = (out / "prepare_report.json").read_text()
    assert not any(title in report for title in set(real["title"]))  # the profile is not leaked either


def test_sample_like_copies_the_photos_per_product(tmp_path):
    """A catalog with 1 to 4 photos per product gives a stand-in with the same distribution of photo counts."""
    multi = sample(tmp_path / "multi", n=300, seed=5, views=4)
    real = load_catalog(multi)
    fake = load_catalog(sample(tmp_path / "like", like=multi, seed=1))
    real_share = real["image_paths"].map(len).value_counts(normalize=True)
    fake_share = fake["image_paths"].map(len).value_counts(normalize=True)
    assert set(fake_share.index) == set(real_share.index) == {1, 2, 3, 4}
    for count in real_share.index:
        assert abs(fake_share[count] - real_share[count]) <= 0.06, count
    for paths in fake["image_paths"]:
        assert all((tmp_path / "like" / p).is_file() for p in paths)
    report = json.loads((tmp_path / "like" / "prepare_report.json").read_text())
    counts = real["image_paths"].map(len).value_counts()
    assert report["like"]["photos_per_product"] == {str(k): int(counts[k]) for k in sorted(counts.index)}


def test_sample_like_with_its_own_size_and_split(prepared, tmp_path):
    fake = load_catalog(sample(tmp_path / "small", like=prepared, n=50, split="0.6,0.2,0.2", seed=2))
    assert len(fake) == 50
    assert fake["split"].value_counts()["train"] >= 25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "--n 0: must be a whole number of products, at least 1"),
        ({"n": -3}, "--n -3: must be"),
        ({"split": "1,x,2"}, "--split '1,x,2'"),
        ({"like": "/nowhere"}, "/nowhere/catalog.parquet: not found"),
        ({"like": ".", "urls_out": "u.csv"}, "--urls-out: not available with --like"),
        ({"like": ".", "views": 3}, "--views: not available with --like"),
        ({"views": 0}, "--views 0: must be a whole number of photos, at least 1"),
    ],
)
def test_bad_sample_arguments(tmp_path, kwargs, message):
    with pytest.raises(PhivisionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
