"""`to_hf_dataset`: the dataset as a real `datasets.DatasetDict`, images and labels included."""

from __future__ import annotations

import datasets
from PIL import Image

from phivision.data import load_catalog, load_image, to_hf_dataset


def test_to_hf_dataset(sample_dataset, tmp_path):
    catalog = load_catalog(sample_dataset)
    ds = to_hf_dataset(sample_dataset)
    assert isinstance(ds, datasets.DatasetDict)
    assert list(ds) == ["train", "val", "test"]
    for split in ds:
        assert ds[split].num_rows == int((catalog["split"] == split).sum())
    assert isinstance(ds["train"].features["image"], datasets.Image)
    assert set(catalog.columns) <= set(ds["train"].column_names)
    assert ds["train"].features["full_price"].dtype == "float64"

    first = ds["test"][0]
    row = catalog[catalog["split"] == "test"].iloc[0]
    assert (first["title"], first["category"], first["full_price"]) == (
        row["title"],
        row["category"],
        row["full_price"],
    )
    assert isinstance(first["image"], Image.Image)
    assert first["image"].size == load_image(sample_dataset / row["image_path"]).size

    # the usual round trips of the ecosystem work on it
    ds.save_to_disk(str(tmp_path / "saved"))
    again = datasets.load_from_disk(str(tmp_path / "saved"))
    assert again["val"].num_rows == ds["val"].num_rows
    assert again["train"][0]["image"].size == ds["train"][0]["image"].size
    raw = to_hf_dataset(sample_dataset, decode=False)["train"][0]["image"]
    assert raw["path"].endswith(catalog[catalog["split"] == "train"].iloc[0]["image_path"])
