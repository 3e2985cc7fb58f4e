import re

import pytest

from phivision.answer.prompt import (
    ParsedAnswer,
    PromptFormat,
    answer_template_parts,
    format_answer,
    parse_answer,
    parse_price,
    prompt_text,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$1,290.00", 1290.0),
        ("1290", 1290.0),
        ("USD 1290.5", 1290.5),
        ("1.290,00 €", 1290.0),
        ("70,000", 70000.0),
        ("12,5", 12.5),
        (32, 32.0),
        ("N.A.", None),
        ("", None),
        (None, None),
        ("-5", 5.0),
        (float("nan"), None),
        (0, None),
    ],
)
def test_parse_price(raw, expected):
    assert parse_price(raw) == expected


def test_prompt_and_answer_round_trip():
    fmt = PromptFormat()
    assert prompt_text(fmt) == "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n"
    assert prompt_text(fmt, 3).startswith("<|user|>\n<|image_1|>\n<|image_2|>\n<|image_3|>What is")
    assert prompt_text(fmt, 0) == "<|user|>\nWhat is shown in this image?<|end|><|assistant|>\n"  # text only
    with pytest.raises(ValueError, match="num_images"):
        prompt_text(fmt, -1)
    answer = format_answer(fmt, "Check Cotton Shirt, Slim", "shirts", 1290)
    assert answer == "Product: Check Cotton Shirt, Slim, Category: shirts, Full Price: 1290.0"
    parsed = parse_answer(answer + "<|end|>")
    assert parsed.title == "Check Cotton Shirt, Slim"
    assert parsed.category == "shirts"
    assert parsed.price == 1290.0
    assert parsed.complete


def test_parse_answer_any_order_and_missing_fields():
    parsed = parse_answer("Full Price: $2,450 Category: bags Product: Leather Tote")
    assert (parsed.title, parsed.category, parsed.price) == ("Leather Tote", "bags", 2450.0)
    partial = parse_answer("Product: Scarf")
    assert (partial.title, partial.category, partial.price) == ("Scarf", None, None)
    assert not partial.complete


@pytest.mark.parametrize("garbage", ["", "???", "Price:", "Category: , Price: abc", None, 42, "<|end|>"])
def test_parse_answer_never_raises(garbage):
    parsed = parse_answer(garbage)
    assert parsed.price is None


# ------------------------------------------------------------------------------- template-driven parser

TEMPLATES = [
    "Product: {title}, Category: {category}, Full Price: {full_price}",
    "{category} | {title} | {full_price} USD",
    "Name={title}; Price={full_price}; Type={category}",
    "This is a {title} from {category}, priced at {full_price}.",
    "Name: {title}\nPrice: {full_price}\nType: {category}",
]
PRODUCTS = [
    ("Check Cotton Shirt", "shirts", 1290.0),
    ("Slim Fit T-Shirt, Navy (2 pack) | limited", "t-shirts", 45.5),
    ("Bag from Italy", "Bags & Totes", 0.99),
    ("Ébène Leather Tote 12", "bags", 70000.0),
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_reads_its_own_answers_back(template):
    fmt = PromptFormat(answer_template=template)
    for title, category, price in PRODUCTS:
        answer = format_answer(fmt, title, category, price)
        for text in (answer, answer + "<|end|>", f"  {answer}  \n"):
            assert parse_answer(text, fmt) == ParsedAnswer(title, category, price), (template, text)


def test_the_default_parser_does_not_read_another_templates_answers_as_complete():
    fmt = PromptFormat(answer_template="{category} | {title} | {full_price} USD")
    answer = format_answer(fmt, "Check Cotton Shirt", "shirts", 1290.0)
    assert not parse_answer(answer).complete
    assert parse_answer(answer, fmt).complete


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Product: {title}, Category: {category}", "lacks {full_price}"),
        ("{title} | {category} | {full_price} | {title}", "{title} appears more than once"),
        ("{title} | {category} | {full_price} | {brand}", "unknown field {brand}"),
        ("{title} | {category} | {0}", "unknown field {0}"),
        ("{title} | {category} | {}", "unknown field {}"),
        ("{title} | {category} | {full_price:.2f}", "without a format spec"),
        ("{title!r} | {category} | {full_price}", "without a format spec"),
        ("{title} {category} | {full_price}", "need fixed text between them"),
        ("{title}{category} | {full_price}", "need fixed text between them"),
        ("{title}.{full_price}.{category}", "cannot be parsed back"),
        ("{title}-{category}-{full_price}", "cannot be parsed back"),
        ("{title}x{category}x{full_price}", "cannot be parsed back"),
        ("Product: {title, Category: {category}, Full Price: {full_price}", "write a literal brace"),
        ("Product: {title}}, Category: {category}, Full Price: {full_price}", "Single '}'"),
    ],
)
def test_bad_templates_are_refused_with_a_clear_message(template, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PromptFormat(answer_template=template)
    with pytest.raises(ValueError, match=re.escape(message)):
        answer_template_parts(template)


def test_literal_braces_and_extra_fixed_text_are_fine():
    fmt = PromptFormat(answer_template="{{item}} {title} :: {{kind}} {category} :: {full_price} EUR")
    answer = format_answer(fmt, "Tote", "bags", 12)
    assert answer == "{item} Tote :: {kind} bags :: 12.0 EUR"
    assert parse_answer(answer, fmt) == ParsedAnswer("Tote", "bags", 12.0)


def test_prompt_format_from_dict_validates_the_template():
    with pytest.raises(ValueError, match="lacks"):
        PromptFormat.from_dict({"answer_template": "{title}"})
    with pytest.raises(ValueError, match="question"):
        PromptFormat(question="  ")


@pytest.mark.parametrize(
    ("template", "answer", "expected"),
    [
        # other spacing and case
        (TEMPLATES[0], "product:Tote,category:bags,FULL PRICE:12", ("Tote", "bags", 12.0)),
        # fields in another order, found by their labels
        (TEMPLATES[2], "Type=bags; Name=Tote; Price=$1,290", ("Tote", "bags", 1290.0)),
        # the opening or closing fixed text left out
        (TEMPLATES[1], "bags | Tote | 12", ("Tote", "bags", 12.0)),
        (TEMPLATES[3], "a Tote from bags, priced at 12", ("a Tote", "bags", 12.0)),
        # cut short by the token budget: completed fields are kept
        (TEMPLATES[0], "Product: Long Tote, Category: ba", ("Long Tote", "ba", None)),
        (TEMPLATES[1], "bags | Long To", ("Long To", "bags", None)),
        (TEMPLATES[3], "This is a Tote from bags, pri", ("Tote", "bags", None)),
        # the model runs on after its answer
        (TEMPLATES[0], "Product: A, Category: b, Full Price: 3\nProduct: B", ("A", "b", 3.0)),
        (TEMPLATES[4], "Name: A\nPrice: 3\nType: b\nName: C", ("A", "b", 3.0)),
        # unrelated text yields nothing rather than a guess
        (TEMPLATES[1], "I cannot tell what this is", (None, None, None)),
    ],
)
def test_near_misses(template, answer, expected):
    assert parse_answer(answer, PromptFormat(answer_template=template)) == ParsedAnswer(*expected)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize(
    "garbage", ["", " ", "|||", "USD", "\n\n", "=;=;", "<|end|>", "<s></s>", "{title}", "a" * 5000, None, 3.5]
)
def test_parse_answer_never_raises_on_any_template(template, garbage):
    parsed = parse_answer(garbage, PromptFormat(answer_template=template))
    assert isinstance(parsed, ParsedAnswer)
    assert not parsed.complete
