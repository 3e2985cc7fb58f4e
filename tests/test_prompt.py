import pytest

from phivision.prompt import PromptFormat, format_answer, parse_answer, parse_price, prompt_text


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
