"""The category space of an answer: the run's labels, then --categories FILE, then the dataset's train split; and
{categories} in the question."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import phivision.answer.generate as generate_module
from phivision.answer.prompt import PromptFormat, parse_answer
from phivision.answer.taxonomy import (
    Taxonomy,
    fill_question,
    model_taxonomy,
    read_categories_file,
    resolve_taxonomy,
    with_taxonomy,
)
from phivision.api import evaluate
from phivision.errors import PhivisionError
from phivision.runs import load_model

RECORDED = ("bags", "hats")
ZERO_SHOT = "Which of these categories is shown: {categories}? Answer with the product's name and price too."


@pytest.fixture()
def file_of_categories(tmp_path):
    path = tmp_path / "categories.txt"
    path.write_text("scarves\n\n  shoes  \nbags\n")
    return path


def train_split(sample_dataset) -> tuple[str, ...]:
    catalog = pd.read_parquet(sample_dataset / "catalog.parquet")
    return tuple(sorted(set(catalog.loc[catalog["split"] == "train", "category"])))


def test_the_three_sources_in_their_order(file_of_categories, sample_dataset) -> None:
    every = resolve_taxonomy(RECORDED, "run/labels.json", file_of_categories, sample_dataset)
    assert every == Taxonomy(
        RECORDED,
        "run",
        "run/labels.json",
        f"--categories {file_of_categories} (3 categories) not used: the model records the 2 it was trained on",
    )
    assert every.to_dict() == {"source": "run", "path": "run/labels.json", "count": 2, "note": every.note}
    file_then_data = resolve_taxonomy(None, None, file_of_categories, sample_dataset)
    assert file_then_data == Taxonomy(("bags", "scarves", "shoes"), "file", str(file_of_categories))
    data_only = resolve_taxonomy(None, None, None, sample_dataset)
    assert data_only == Taxonomy(train_split(sample_dataset), "data", str(sample_dataset))
    assert resolve_taxonomy(None) == Taxonomy(None, "none")
    same = resolve_taxonomy(("shoes", "bags", "scarves"), "x", file_of_categories)
    assert same.source == "run" and same.note is None  # the same list: nothing to say


def test_a_broken_file_stops_even_beside_recorded_labels(tmp_path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('["bags", 3]')
    with pytest.raises(PhivisionError, match=r"--categories .*broken.json item 2: expected a category"):
        resolve_taxonomy(RECORDED, "run/labels.json", broken)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no categories in the file"),
        ("\n  \n", "no categories in the file"),
        ("[]", "no categories in the file"),
        ('["bags", "a\\nb"]', 'item 2: expected a category as one line of text, got "a\\\\nb"'),
        ('["bags",', "line 1: not a JSON list"),
        ("bags\n\x07bell\n", "line 2: expected a category as one line of text"),
    ],
)
def test_bad_category_files_name_the_file_and_line(tmp_path, content, message) -> None:
    path = tmp_path / "cats.txt"
    path.write_text(content)
    with pytest.raises(PhivisionError, match=message):
        read_categories_file(path)


def test_category_files_one_per_line_or_json(tmp_path, file_of_categories) -> None:
    assert read_categories_file(file_of_categories) == ("bags", "scarves", "shoes")
    as_json = tmp_path / "cats.json"
    as_json.write_text(json.dumps(["Boxes & Luggage", "t-shirts", "t-shirts"]))
    assert read_categories_file(as_json) == ("Boxes & Luggage", "t-shirts")
    with pytest.raises(PhivisionError, match=r"--categories .*nowhere.txt: no such file"):
        read_categories_file(tmp_path / "nowhere.txt")


def test_the_question_names_the_categories() -> None:
    prompt = PromptFormat(question=ZERO_SHOT)
    filled = fill_question(prompt, ("bags", "hats"))
    assert filled.question == (
        "Which of these categories is shown: bags, hats? Answer with the product's name and price too."
    )
    assert filled.answer_template == prompt.answer_template
    assert fill_question(PromptFormat(), ("bags",)) == PromptFormat()  # the seed's question is left alone
    with pytest.raises(PhivisionError, match=r"holds \{categories\} but there is no category list"):
        fill_question(prompt, None)


def test_a_model_with_recorded_labels_keeps_them(tiny_checkpoint, file_of_categories, sample_dataset) -> None:
    loaded = load_model(tiny_checkpoint, device="cpu")
    assert model_taxonomy(loaded, None, sample_dataset).source == "data"  # a bare checkpoint records none
    loaded.categories, loaded.labels_path = RECORDED, "run/labels.json"
    taxonomy = model_taxonomy(loaded, file_of_categories, sample_dataset)
    assert taxonomy.categories == RECORDED and taxonomy.source == "run"
    asked = with_taxonomy(loaded, taxonomy, question="Pick one of {categories}.")
    assert asked.prompt.question == "Pick one of bags, hats." and asked.categories == RECORDED
    assert asked.model is loaded.model and loaded.prompt == PromptFormat()  # a copy, the weights shared
    with pytest.raises(PhivisionError, match="--question: question: must be non-empty text"):
        with_taxonomy(loaded, taxonomy, question="  ")


def spy_on_questions(monkeypatch) -> list[str]:
    """Record the question of every generate call, and let the real generation run."""
    asked: list[str] = []
    real = generate_module.generate_completions

    def spy(model, processor, images, prompt, *args, **kwargs):
        asked.append(prompt.question)
        return real(model, processor, images, prompt, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_completions", spy)
    return asked


def test_evaluate_answers_within_the_train_split_and_asks_the_zero_shot_question(
    tiny_checkpoint, sample_dataset, tmp_path, monkeypatch
) -> None:
    asked = spy_on_questions(monkeypatch)
    metrics = evaluate(
        tiny_checkpoint,
        sample_dataset,
        out=tmp_path,
        limit=4,
        progress=False,
        question=ZERO_SHOT,
        max_new_tokens=40,
    )
    categories = train_split(sample_dataset)
    expected = ZERO_SHOT.replace("{categories}", ", ".join(categories))
    assert set(asked) == {expected} and metrics["question"] == expected
    assert metrics["taxonomy"] == {"source": "data", "path": str(sample_dataset), "count": len(categories)}
    assert metrics["constraint"] == "categories"
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(parse_answer(r["answer"]).category in categories for r in records)


def test_evaluate_with_a_file_of_categories(tiny_checkpoint, sample_dataset, file_of_categories) -> None:
    metrics = evaluate(
        tiny_checkpoint,
        sample_dataset,
        categories=file_of_categories,
        limit=3,
        progress=False,
        max_new_tokens=40,
    )
    assert metrics["taxonomy"] == {"source": "file", "path": str(file_of_categories), "count": 3}
    assert metrics["per_category"]  # scored as usual against the catalog's own categories
