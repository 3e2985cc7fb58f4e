"""`phivision predict`: JSON lines for files and directories; unreadable images become error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_helpers import png_bytes
from typer.testing import CliRunner

from phivision.api import predict
from phivision.cli import app
from phivision.errors import PhivisionError
from phivision.serve.core import prediction_record
from phivision.serve.predict import expand_inputs


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "b.png").write_bytes(png_bytes(color=(10, 200, 10)))
    (folder / "a.png").write_bytes(png_bytes(color=(200, 10, 10)))
    (folder / "broken.png").write_bytes(png_bytes(size=(200, 150))[:200])  # cut off mid-file
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_predict_cli_writes_json_lines(lora_run: Path, photos: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra.png"
    extra.write_bytes(png_bytes(size=(40, 80)))
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(photos),
            str(extra),
            "--model",
            str(lora_run),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.png", "broken.png", "extra.png"]
    for record in records:
        if Path(record["image"]).name == "broken.png":
            assert set(record) == {"image", "error"}
        else:
            assert set(record) == set(prediction_record("x.png", ""))  # the one record builder's fields
            assert isinstance(record["answer"], str)
            assert record["currency"] is None  # this hand-made run records no label space


def test_predict_to_file_matches_stdout(lora_run: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.jsonl"
    returned = predict(
        [photos], lora_run, out=out, batch_size=3, max_new_tokens=8, device="cpu", progress=False
    )
    assert [("error" in r) for r in returned] == [False, False, True]  # a.png, b.png, broken.png
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == returned
    # Batch size does not change greedy answers.
    again = predict(
        [photos], lora_run, out=tmp_path / "again.jsonl", batch_size=1, max_new_tokens=8, device="cpu"
    )
    assert sum("error" not in r for r in again) == 2
    assert [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()] == records


def test_predict_exit_code_when_nothing_readable(lora_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["predict", str(bad), "--model", str(lora_run), "--max-new-tokens", "8"])
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[0])["error"].startswith("not_an_image")


def test_bad_inputs_raise_before_loading(tmp_path: Path) -> None:
    with pytest.raises(PhivisionError, match="no such file"):
        expand_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhivisionError, match="no image files"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(PhivisionError, match="--batch-size"):
        predict([tmp_path], "unused", batch_size=0)


def test_predict_a_product_per_folder_or_per_table_row(lora_run: Path, tmp_path: Path) -> None:
    """Several photos of one product answered in one prompt: a folder per product, or a table of paths; the
    record names the product and the photos used (at most --max-images, the first in name or list order)."""
    for name, colors in (("tote", [(200, 10, 10), (10, 10, 200)]), ("hat", [(10, 200, 10)])):
        folder = tmp_path / "products" / name
        folder.mkdir(parents=True)
        for k, color in enumerate(colors):
            (folder / f"{k}.png").write_bytes(png_bytes(color=color))
    table = tmp_path / "products.csv"
    table.write_text(
        'product_code,image_paths\nT1,"[""products/tote/1.png"", ""products/tote/0.png""]"\nH2,products/hat/0.png\n'
    )
    common = {"max_new_tokens": 8, "device": "cpu", "progress": False}
    by_folder = predict([tmp_path / "products"], lora_run, products=True, max_images=2, **common)
    assert [r["id"] for r in by_folder] == [str(tmp_path / "products" / n) for n in ("hat", "tote")]
    assert [[Path(p).name for p in r["images"]] for r in by_folder] == [["0.png"], ["0.png", "1.png"]]
    assert all(r["image"] == r["images"][0] and isinstance(r["answer"], str) for r in by_folder)
    by_table = predict([table], lora_run, max_images=2, **common)
    assert [(r["id"], [Path(p).name for p in r["images"]]) for r in by_table] == [
        ("T1", ["1.png", "0.png"]),
        ("H2", ["0.png"]),
    ]
    # the model was trained with one photo per prompt: by default a product gets its first photo only
    first_only = predict([table], lora_run, **common)
    assert [len(r["images"]) for r in first_only] == [1, 1]
    # without --products a folder is its images, answered one by one
    assert len(predict([tmp_path / "products" / "tote"], lora_run, **common)) == 2
    with pytest.raises(
        PhivisionError, match=r"products.csv row 3: column 'image_paths': .*missing.png: no such"
    ):
        table.write_text("product_code,image_paths\nT1,products/tote/0.png\nH2,products/missing.png\n")
        predict([table], lora_run, **common)
    with pytest.raises(PhivisionError, match="no column 'image_paths'"):
        table.write_text("product_code,path\nT1,products/tote/0.png\n")
        predict([table], lora_run, **common)
