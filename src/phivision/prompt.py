"""The one prompt builder and the one answer parser.

Training formats answers with :func:`format_answer`; evaluation, predict and serve read them back with
:func:`parse_answer`. Keeping both here means a change to the answer format cannot drift between the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

DEFAULT_QUESTION = "What is shown in this image?"
DEFAULT_ANSWER_TEMPLATE = "Product: {title}, Category: {category}, Full Price: {full_price}"
END_TAG = "<|end|>"


@dataclass(frozen=True)
class PromptFormat:
    """The exchange the model is trained on: one user turn with the image, one assistant answer."""

    question: str = DEFAULT_QUESTION
    answer_template: str = DEFAULT_ANSWER_TEMPLATE

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> PromptFormat:
        data = dict(data or {})
        unknown = set(data) - {"question", "answer_template"}
        if unknown:
            raise ValueError(f"unknown prompt keys: {sorted(unknown)}")
        return cls(**data)


def prompt_text(fmt: PromptFormat = PromptFormat(), num_images: int = 1) -> str:
    """The user turn up to and including the assistant tag, exactly as trained:
    ``<|user|>\\n<|image_1|>What is shown in this image?<|end|><|assistant|>\\n``."""
    tags = "".join(f"<|image_{i}|>" for i in range(1, num_images + 1))
    return f"<|user|>\n{tags}{fmt.question}{END_TAG}<|assistant|>\n"


def format_price(price: float) -> str:
    """Prices as the cookbook writes them (``1290.0``), rounded to cents."""
    return str(round(float(price), 2))


def format_answer(fmt: PromptFormat, title: str, category: str, full_price: float) -> str:
    """The assistant's answer for one product (without the closing ``<|end|>``, which the processor adds)."""
    return fmt.answer_template.format(title=title, category=category, full_price=format_price(full_price))


# --------------------------------------------------------------------------------------------- prices

_CURRENCY = re.compile(r"(?i)\b(?:usd|eur|gbp|jpy|cny|rmb|chf|cad|aud|hkd|sgd|krw|inr|us)\b|[$€£¥₩₹]")
_NUMBER = re.compile(r"\d[\d.,'\s]*")


def parse_price(value: object) -> float | None:
    """Parse a price written by a person or a model: ``$1,290.00``, ``1290``, ``USD 1290.5``, ``1.290,00 €``.

    Returns a positive finite float, or None when nothing usable is there. Never raises.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
        return number if math.isfinite(number) and number > 0 else None
    text = _CURRENCY.sub(" ", str(value)).strip()
    match = _NUMBER.search(text)
    if not match:
        return None
    raw = re.sub(r"[\s']", "", match.group(0)).rstrip(".,")
    if not raw:
        return None
    if "," in raw and "." in raw:
        decimal = "," if raw.rfind(",") > raw.rfind(".") else "."
        thousands = "." if decimal == "," else ","
        raw = raw.replace(thousands, "").replace(decimal, ".")
    elif "," in raw:
        groups = raw.split(",")
        if len(groups) > 2 or len(groups[-1]) == 3:
            raw = raw.replace(",", "")  # 1,290 or 1,290,000: thousands
        else:
            raw = raw.replace(",", ".")  # 12,5: decimal comma
    elif raw.count(".") > 1:
        raw = raw.replace(".", "")  # 1.290.000: thousands
    try:
        number = float(raw)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


# --------------------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class ParsedAnswer:
    """Fields found in a model's answer; None where the field is missing or unreadable."""

    title: str | None
    category: str | None
    price: float | None

    @property
    def complete(self) -> bool:
        return self.title is not None and self.category is not None and self.price is not None

    def to_dict(self) -> dict:
        return asdict(self)


_LABELS = {
    "title": r"product(?:\s+name)?|title|name",
    "category": r"category",
    "price": r"(?:full\s+)?price",
}
_LABEL = re.compile(
    r"(?i)(?<![\w])(?P<label>" + "|".join(f"(?P<{k}>{v})" for k, v in _LABELS.items()) + r")\s*[:=]\s*"
)
_SPECIAL = re.compile(r"<\|[a-z0-9_]+\|>|</?s>")


def _clean_field(value: str) -> str | None:
    value = value.strip().strip(",;|").strip()
    return value or None


def parse_answer(text: object) -> ParsedAnswer:
    """Find product, category and price in a model's answer, in any order. Never raises.

    Each field's value runs from its label (``Product:``, ``Category:``, ``Full Price:``) to the next label or the
    end of the answer, so titles with commas survive. A field given twice keeps its first value.
    """
    if not isinstance(text, str):
        return ParsedAnswer(None, None, None)
    text = _SPECIAL.split(text, maxsplit=1)[0] if "<|end|>" in text else _SPECIAL.sub(" ", text)
    matches = list(_LABEL.finditer(text))
    found: dict[str, str | None] = {}
    for i, match in enumerate(matches):
        field = next(k for k in _LABELS if match.group(k) is not None)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = text[match.end() : end].split("\n")[0]
        if field not in found:
            found[field] = _clean_field(value)
    price = parse_price(found.get("price")) if found.get("price") else None
    return ParsedAnswer(title=found.get("title"), category=found.get("category"), price=price)
