"""evaluate end to end: the tiny checkpoint on small catalogs, files written, keys present, failures counted."""

from __future__ import annotations

import json
import re
import sys

import pandas as pd
import pytest
from eval_helpers import oracle_answers, write_catalog
from typer.testing import CliRunner

import phivision.answer.generate as generate_module
from phivision.api import evaluate
from phivision.cli import app, main
from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError
from phivision.evaluate.metrics import HEADLINE, format_value
from phivision.runs import load_model

FLAT_KEYS = [
    "n",
    "parse_rate",
    "price_mae",
    "price_mape",
    "price_median_ape",
    "price_within_10pct",
    "price_log_rmse",
    "category_accuracy",
    "category_macro_f1",
    "title_exact",
    "title_similarity",
    "baseline_price_mape",
    "baseline_category_accuracy",
]


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
    return write_catalog(tmp_path_factory.mktemp("eval") / "data")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


def test_evaluate_tiny_checkpoint_writes_metrics_and_predictions(
    tiny_checkpoint, catalog_dir, tmp_path
) -> None:
    out = tmp_path / "run" / "metrics.json"
    metrics = evaluate(tiny_checkpoint, catalog_dir, split="test", out=out, batch_size=4, max_new_tokens=8)
    assert json.loads(out.read_text()) == json.loads(json.dumps(metrics))
    for key in [
        *FLAT_KEYS,
        "category1_accuracy",
        "category2_accuracy",
        "per_category",
        "baseline",
        "scoring",
    ]:
        assert key in metrics, key
    assert metrics["n"] == 12 and metrics["split"] == "test" and metrics["image_errors"] == 0
    assert sum(row["n"] for row in metrics["per_category"].values()) == 12
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12
    first = json.loads(lines[0])
    assert first["id"] == "P001"
    assert first["image"].endswith("item001.png")
    assert first["truth"]["category"] == "Bags" and first["truth"]["category1_code"] == "WOMEN"
    assert set(first["parsed"]) == {"title", "category", "price"}
    assert {"price_ape", "category_correct", "title_similarity", "complete"} <= set(first["errors"])
    # every item is scored, parsed or not: the failures are exactly the incomplete records
    incomplete = sum(not json.loads(line)["errors"]["complete"] for line in lines)
    assert metrics["parse_rate"] == pytest.approx(1 - incomplete / 12)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("parse_rate", "category_accuracy", "title_similarity"))


def test_evaluate_accepts_a_loaded_model_and_limit(loaded, catalog_dir) -> None:
    metrics = evaluate(loaded, catalog_dir, split="train", limit=5, max_new_tokens=4, progress=False)
    assert metrics["n"] == 5 and metrics["split"] == "train"
    assert metrics["model"] == loaded.source


def test_evaluate_on_the_sample_dataset(loaded, sample_dataset, tmp_path) -> None:
    catalog = pd.read_parquet(sample_dataset / "catalog.parquet")
    metrics = evaluate(loaded, sample_dataset, split="val", out=tmp_path, max_new_tokens=6, progress=False)
    assert metrics["n"] == int((catalog["split"] == "val").sum())
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == metrics["n"]
    assert (tmp_path / "metrics.json").is_file()
    # the sample catalog carries three category levels: each gets an accuracy
    assert {"category1_accuracy", "category2_accuracy", "category3_accuracy"} <= set(metrics)


def test_scores_follow_the_answers(monkeypatch, catalog_dir, loaded) -> None:
    catalog = pd.read_parquet(catalog_dir / "catalog.parquet")
    monkeypatch.setattr(generate_module, "generate_answers", oracle_answers(catalog, "good"))
    metrics = evaluate(loaded, catalog_dir, progress=False)
    # test items are the odd indices; answer kinds cycle with i % 6 -> 1, 3, 5 repeat four times each
    # kind 1: price +4%, right category; kind 3: price x2.5, wrong category; kind 5: unparseable
    assert metrics["n"] == 12
    assert metrics["parse_rate"] == pytest.approx(8 / 12)
    assert metrics["category_accuracy"] == pytest.approx(4 / 12)
    assert metrics["price_within_10pct"] == pytest.approx(4 / 12)
    # an unparseable answer costs the worse of the train median's APE and 1.0
    median = catalog.loc[catalog["split"] == "train", "full_price"].median()
    test = catalog[catalog["split"] == "test"]
    missing = [max(abs(median - p) / p, 1.0) for i, p in test["full_price"].items() if i % 6 == 5]
    assert len(missing) == 4 and max(missing) > 1.0  # the cheap items: the median is the worse guess
    assert metrics["price_mape"] == pytest.approx((4 * 0.04 + 4 * 1.5 + sum(missing)) / 12, rel=1e-3)
    assert metrics["title_exact"] == pytest.approx(8 / 12)


def test_unreadable_image_is_a_failure_not_a_crash(monkeypatch, tmp_path, loaded) -> None:
    data = write_catalog(tmp_path / "data", n=8)
    (data / "images" / "item003.png").write_bytes(b"not a png")
    catalog = pd.read_parquet(data / "catalog.parquet")
    monkeypatch.setattr(generate_module, "generate_answers", oracle_answers(catalog, "good"))
    metrics = evaluate(loaded, data, out=tmp_path / "out", progress=False)
    assert metrics["n"] == 4 and metrics["image_errors"] == 1
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    broken = next(r for r in records if r["id"] == "P003")
    assert broken["answer"] == "" and broken["errors"]["complete"] is False
    assert broken["image_error"].startswith("not_an_image")


def test_user_errors(loaded, catalog_dir, tmp_path) -> None:
    with pytest.raises(PhivisionError, match="--split 'dev'"):
        evaluate(loaded, catalog_dir, split="dev")
    with pytest.raises(PhivisionError, match="--limit 0"):
        evaluate(loaded, catalog_dir, limit=0)
    with pytest.raises(PhivisionError, match="catalog.parquet: not found"):
        evaluate(loaded, tmp_path)
    data = write_catalog(tmp_path / "only_train", n=4)
    catalog = pd.read_parquet(data / "catalog.parquet")
    catalog["split"] = "test"
    catalog.to_parquet(data / "catalog.parquet")
    with pytest.raises(PhivisionError, match="no train rows"):
        evaluate(loaded, data)


def test_eval_dir_layout(tmp_path) -> None:
    assert RunLayout(tmp_path).eval_dir("after") == tmp_path / "eval" / "after"


def test_cli_evaluate(tiny_checkpoint, catalog_dir, tmp_path) -> None:
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(tiny_checkpoint), "--data", str(catalog_dir), "--out", str(tmp_path / "e"),
         "--limit", "3", "--max-new-tokens", "4", "--batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n"] == 3
    # the printed summary has every headline metric, with its baseline beside it
    for key, label, kind in HEADLINE:
        if key in metrics:
            assert re.search(
                rf"{re.escape(label)}\s+{re.escape(format_value(metrics[key], kind))}\s", result.output
            )
    assert (tmp_path / "e" / "predictions.jsonl").is_file()


def test_cli_user_error_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    argv = [
        "phivision",
        "evaluate",
        "--model",
        str(tmp_path / "nope"),
        "--data",
        str(tmp_path),
        "--out",
        "m.json",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "catalog.parquet" in err
