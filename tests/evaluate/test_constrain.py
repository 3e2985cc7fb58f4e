"""Constrained answers on the tiny checkpoint: llguidance masks through generate_answers, with the real tokenizer."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
from eval_helpers import ScriptedHead
from PIL import Image

from phivision.answer.constrain import AnswerConstraint, AnswerGuide, answer_grammar, constraint_name
from phivision.answer.generate import generate_answers
from phivision.answer.prompt import PromptFormat, format_answer, parse_answer
from phivision.runs import load_model

TEMPLATES = [
    "Product: {title}, Category: {category}, Full Price: {full_price}",
    "{category} | {title} | {full_price} USD",
    "Name={title}; Price={full_price}; Type={category}",
    "This is a {title} from {category}, priced at {full_price}.",
]
CATEGORIES = ("bags", "shirts", "t-shirts", "Boxes & Luggage")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    sizes = [(64, 64), (200, 50), (50, 300), (120, 90), (80, 80), (300, 40)]
    return [Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)) for i, size in enumerate(sizes)]


def guide_for(loaded, constraint: AnswerConstraint) -> AnswerGuide:
    stop = loaded.processor.stop_token_ids[0]
    return AnswerGuide(loaded.processor.tokenizer, constraint, loaded.model.config.vocab_size, stop)


def generate(loaded, images, fmt, constraint, **kwargs) -> list[str]:
    kwargs.setdefault("max_new_tokens", 64)
    return generate_answers(
        loaded.model, loaded.processor, images, fmt, progress=False, constraint=constraint, **kwargs
    )


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_grammar_accepts_every_catalog_answer_as_the_tokenizer_spells_it(
    loaded, sample_dataset, template
):
    """Training answers, tokenized as training tokenizes them, pass the mask: a trained model is not steered."""
    catalog = pd.read_parquet(sample_dataset / "catalog.parquet")
    fmt = PromptFormat(answer_template=template)
    guide = guide_for(loaded, AnswerConstraint(fmt, tuple(catalog["category"].unique())))
    tokenizer = loaded.processor.tokenizer
    for row in catalog.itertuples():
        answer = format_answer(fmt, row.title, row.category, row.full_price)
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [guide.stop_id]
        matcher = guide.new_matcher()
        assert matcher.validate_tokens(ids) == len(ids), answer
    outside = format_answer(fmt, "Check Shirt", "not-a-category", 10.0)
    ids = tokenizer(outside, add_special_tokens=False)["input_ids"] + [guide.stop_id]
    assert guide.new_matcher().validate_tokens(ids) < len(ids)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("categories", [CATEGORIES, None])
def test_an_untrained_model_always_answers_in_the_template(loaded, images, template, categories) -> None:
    fmt = PromptFormat(answer_template=template)
    constraint = AnswerConstraint(fmt, categories)
    free = [parse_answer(a, fmt) for a in generate(loaded, images, fmt, None)]
    assert not any(p.complete for p in free)  # the random model does not write the template by itself
    answers = generate(loaded, images, fmt, constraint, batch_size=4)
    for answer in answers:
        parsed = parse_answer(answer, fmt)
        assert parsed.complete, answer
        assert parsed.price > 0
        if categories is not None:
            assert parsed.category in categories
        assert answer.startswith(fmt.answer_template.split("{")[0])


def test_a_budget_too_small_for_the_template_is_raised_not_cut(loaded, images) -> None:
    fmt = PromptFormat()
    constraint = AnswerConstraint(fmt, CATEGORIES)
    guide = guide_for(loaded, constraint)
    with pytest.warns(UserWarning, match=f"using {guide.min_new_tokens}"):
        answers = generate(loaded, images, fmt, constraint, max_new_tokens=5)
    assert all(parse_answer(a, fmt).complete for a in answers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a budget that fits raises no warning
        answers = generate(loaded, images[:2], fmt, constraint, max_new_tokens=guide.min_new_tokens)
    assert all(parse_answer(a, fmt).complete for a in answers)


def test_constrained_batches_equal_one_at_a_time_and_keep_order(loaded, images) -> None:
    fmt = PromptFormat(answer_template=TEMPLATES[1])
    constraint = AnswerConstraint(fmt, CATEGORIES)
    batched = generate(loaded, images, fmt, constraint, batch_size=4)
    single = [generate(loaded, [image], fmt, constraint, batch_size=1)[0] for image in images]
    assert batched == single
    assert generate(loaded, images[::-1], fmt, constraint, batch_size=3) == batched[::-1]


def scripted_model(tiny_checkpoint, text: str):
    loaded = load_model(tiny_checkpoint, device="cpu")
    tokenizer = loaded.processor.tokenizer
    script = tokenizer(text, add_special_tokens=False)["input_ids"] + [loaded.processor.stop_token_ids[0]]
    loaded.model.lm_head = ScriptedHead(loaded.model.config.vocab_size, script)
    return loaded


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_model_that_follows_the_template_writes_the_same_answer(tiny_checkpoint, images, template) -> None:
    fmt = PromptFormat(answer_template=template)
    answer = format_answer(fmt, "Check Cotton Shirt, Slim", "t-shirts", 1290.0)
    free = generate(scripted_model(tiny_checkpoint, answer), images[:1], fmt, None)
    kept = generate(
        scripted_model(tiny_checkpoint, answer), images[:1], fmt, AnswerConstraint(fmt, CATEGORIES)
    )
    assert free == kept == [answer]


def test_a_model_that_strays_is_kept_inside_the_label_space(tiny_checkpoint, images) -> None:
    fmt = PromptFormat()
    stray = "Product: Red Dress, Category: dresses, Full Price: -12 dollars and more text"
    loaded = scripted_model(tiny_checkpoint, stray)
    (answer,) = generate(loaded, images[:1], fmt, AnswerConstraint(fmt, CATEGORIES))
    parsed = parse_answer(answer, fmt)
    assert parsed.complete and parsed.category in CATEGORIES and parsed.price > 0
    assert parsed.title == "Red Dress"  # the free-text title is the model's own


def test_the_grammar_quotes_categories_and_names_the_constraint() -> None:
    constraint = AnswerConstraint(PromptFormat(), ('say "hi"', "Écharpes", "bags", "bags"))
    grammar = answer_grammar(constraint, lead=" ")
    assert '"say \\"hi\\""' in grammar and '"Écharpes"' in grammar
    assert grammar.count('"bags"') == 1  # duplicates are dropped
    assert '" Product: "' in grammar
    assert constraint_name(None) == "off"
    assert constraint_name(AnswerConstraint(PromptFormat())) == "format"
    assert constraint_name(constraint) == "categories"
    with pytest.raises(ValueError, match="categories"):
        AnswerConstraint(PromptFormat(), ("bags", "two\nlines"))
    with pytest.raises(ValueError, match="categories"):
        AnswerConstraint(PromptFormat(), ())


def test_a_category_with_quotes_and_accents_compiles_and_is_generated(loaded, images) -> None:
    fmt = PromptFormat()
    constraint = AnswerConstraint(fmt, ('say "hi"', "Écharpes"))
    answers = generate(loaded, images[:3], fmt, constraint)
    assert {parse_answer(a, fmt).category for a in answers} <= {'say "hi"', "Écharpes"}
