"""The answer contract end to end: a custom answer template trains, evaluates, predicts and exports, every answer
parses with the run's template, the category stays in the training split's set, and the currency travels."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from phivision.answer.calibration import PriceRange, read_calibration
from phivision.answer.prompt import PromptFormat, parse_answer
from phivision.api import evaluate
from phivision.cli import app
from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError
from phivision.labels import LabelSpace, read_labels, write_labels
from phivision.runs import load_model
from phivision.serve.export import export_run
from phivision.serve.predict import predict_images, prediction_record
from phivision.train.config import load_config
from phivision.train.loop import train

TEMPLATES = [
    "{category} | {title} | {full_price} USD",
    "Name={title}; Price={full_price}; Type={category}",
    "This is a {title} from {category}, priced at {full_price}.",
]


def short_run(tiny_checkpoint: Path, data: Path, out: Path, template: str, *overrides: str) -> Path:
    config = load_config(
        None,
        [
            "data.batch_size=2",
            "schedule.max_steps=2",
            "optim.lr=1e-3",
            "eval.gen_samples=2",
            "eval.max_samples=2",
            *overrides,
        ],
        model=str(tiny_checkpoint),
        out=str(out),
        data={"path": str(data)},
        prompt={"answer_template": template},
    )
    train(config, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, sample_dataset, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {
        t: short_run(tiny_checkpoint, sample_dataset, root / f"run{i}", t) for i, t in enumerate(TEMPLATES)
    }


def train_categories(data: Path) -> set[str]:
    catalog = pd.read_parquet(data / "catalog.parquet")
    return set(catalog.loc[catalog["split"] == "train", "category"])


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_custom_template_trains_evaluates_and_predicts_with_every_answer_parsed(
    runs, sample_dataset, template, tmp_path
) -> None:
    run = runs[template]
    fmt = PromptFormat(answer_template=template)
    labels = read_labels(run)
    assert set(labels.categories) == train_categories(sample_dataset)
    assert labels.currency == "USD"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["parse_rate"] for r in history if r["type"] == "eval"] == [1.0]  # training's own evaluation

    loaded = load_model(run, device="cpu")
    assert loaded.prompt == fmt and loaded.categories == labels.categories and loaded.currency == "USD"
    metrics = evaluate(loaded, sample_dataset, split="test", out=tmp_path / "eval", progress=False)
    assert metrics["parse_rate"] == 1.0 and metrics["constraint"] == "categories"
    for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        parsed = {k: v for k, v in record["parsed"].items() if k not in ("price_low", "price_high")}
        assert parse_answer(record["answer"], fmt).to_dict() == parsed
        assert record["parsed"]["category"] in labels.categories

    images = sorted((sample_dataset / "images").iterdir())[:3]
    records = list(predict_images(loaded, images, batch_size=2, progress=False))
    assert [r["image"] for r in records] == [str(p) for p in images]
    for record in records:
        assert record["currency"] == "USD"
        assert record["category"] in labels.categories and record["price"] > 0 and record["title"]


def test_no_constrain_compares_free_generation(runs, sample_dataset, tmp_path) -> None:
    run = runs[TEMPLATES[0]]
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(sample_dataset),
            "--out",
            str(tmp_path / "free"),
            "--max-new-tokens",
            "8",
            "--no-constrain",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert metrics["constraint"] == "off"
    assert metrics["parse_rate"] < 1.0  # two training steps do not teach the template: the constraint does

    images = sorted((sample_dataset / "images").iterdir())[:2]
    for flag, complete in (("--no-constrain", False), ("--constrain", True)):
        cap = [] if complete else ["--max-new-tokens", "8"]  # the default cap fits a constrained answer
        args = ["predict", *map(str, images), "--model", str(run), *cap, flag]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(records) == 2 and all(r["currency"] == "USD" for r in records)
        assert all((r["price"] is not None and r["category"] is not None) == complete for r in records)


def test_training_evaluation_can_run_unconstrained(tiny_checkpoint, sample_dataset, tmp_path) -> None:
    run = short_run(tiny_checkpoint, sample_dataset, tmp_path / "run", TEMPLATES[1], "eval.constrain=false")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["parse_rate"] for r in history if r["type"] == "eval"] == [0.0]


def test_an_export_carries_the_label_space(runs, tmp_path) -> None:
    run = runs[TEMPLATES[2]]
    out = export_run(run, tmp_path / "export")
    info = json.loads((out / "phivision.json").read_text())
    assert info["labels"] == read_labels(run).to_dict()
    loaded = load_model(out, device="cpu")
    assert loaded.prompt.answer_template == TEMPLATES[2]
    assert loaded.categories == read_labels(run).categories and loaded.currency == "USD"


def test_a_bad_template_stops_training_before_the_model_loads(
    tiny_checkpoint, sample_dataset, tmp_path
) -> None:
    with pytest.raises((PhivisionError, ValueError), match="answer_template"):
        short_run(tiny_checkpoint, sample_dataset, tmp_path / "bad", "{title} {category} {full_price}")
    assert not (tmp_path / "bad" / "adapter").exists()


# ------------------------------------------------------------------------------------------ label space


def test_label_space_from_rows_and_round_trip(tmp_path) -> None:
    labels = LabelSpace.from_rows(["shirts", "bags", "shirts", None], ["USD", "USD"])
    assert labels == LabelSpace(("bags", "shirts"), "USD")
    assert LabelSpace.from_rows(["bags"], ["USD", "EUR"]).currency is None  # mixed: no single currency
    write_labels(tmp_path, labels)
    assert read_labels(tmp_path) == labels
    assert read_labels(tmp_path / "missing") == LabelSpace()


@pytest.mark.parametrize(
    "content", ["{", "[]", '{"categories": "bags"}', '{"categories": [], "currency": "USD"}', '{"color": 1}']
)
def test_a_broken_labels_file_names_the_file(tmp_path, content) -> None:
    (tmp_path / RunLayout.LABELS).write_text(content)
    with pytest.raises(PhivisionError, match=RunLayout.LABELS):
        read_labels(tmp_path)


def test_prediction_record_follows_the_template_and_carries_the_currency() -> None:
    fmt = PromptFormat(answer_template=TEMPLATES[0])
    record = prediction_record("a.png", "bags | Tote, Large | 12.5 USD", fmt, "USD")
    assert record == {
        "image": "a.png",
        "title": "Tote, Large",
        "category": "bags",
        "price": 12.5,
        "price_low": None,
        "price_high": None,
        "price_level": None,
        "currency": "USD",
        "answer": "bags | Tote, Large | 12.5 USD",
    }
    ranged = prediction_record("a.png", "bags | Tote | 12.5 USD", fmt, "USD", PriceRange(10.0, 15.25, 0.8))
    assert (ranged["price_low"], ranged["price_high"], ranged["price_level"]) == (10.0, 15.25, 0.8)


def test_a_finished_run_is_calibrated_and_every_output_carries_its_range(
    runs, sample_dataset, tmp_path
) -> None:
    """Training ends with a calibration on the whole val split; evaluate, predict and an export use it."""
    run = runs[TEMPLATES[0]]
    calibration = read_calibration(run)
    val = pd.read_parquet(sample_dataset / "catalog.parquet").query("split == 'val'")
    assert (
        calibration.n == len(val)
        and calibration.source == f"val split of {sample_dataset} ({len(val)} items)"
    )

    loaded = load_model(run, device="cpu")
    assert loaded.calibration == calibration
    metrics = evaluate(loaded, sample_dataset, out=tmp_path / "eval", max_new_tokens=40, progress=False)
    records = [
        json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    covered = [r["parsed"]["price_low"] <= r["truth"]["price"] <= r["parsed"]["price_high"] for r in records]
    assert metrics["price_interval_coverage"] == pytest.approx(sum(covered) / len(covered))
    widths = [(r["parsed"]["price_high"] - r["parsed"]["price_low"]) / r["truth"]["price"] for r in records]
    assert metrics["price_interval_width"] == pytest.approx(sum(widths) / len(widths))
    assert metrics["price_interval"]["calibration"]["how"] == "the model's calibration"
    assert all("price_interval_coverage" in row for row in metrics["per_category"].values())
    assert {"price_interval_coverage", "price_interval_width"} <= set(metrics["baseline"])

    images = sorted((sample_dataset / "images").iterdir())[:3]
    predicted = list(predict_images(loaded, images, max_new_tokens=40, progress=False, price_level=0.5))
    assert all(r["price_low"] < r["price"] < r["price_high"] and r["price_level"] == 0.5 for r in predicted)
    command = [
        "predict",
        str(images[0]),
        "--model",
        str(run),
        "--max-new-tokens",
        "40",
        "--price-level",
        "0.5",
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.splitlines()[0])  # the JSON line `phivision predict` prints
    assert (printed["price_low"], printed["price_high"]) == (
        predicted[0]["price_low"],
        predicted[0]["price_high"],
    )

    from phivision.serve.export import export_run

    exported = load_model(export_run(run, tmp_path / "export"), device="cpu")
    assert exported.calibration == calibration
    again = list(predict_images(exported, images, max_new_tokens=40, progress=False, price_level=0.5))
    assert [(r["price_low"], r["price_high"]) for r in again] == [
        (r["price_low"], r["price_high"]) for r in predicted
    ]
