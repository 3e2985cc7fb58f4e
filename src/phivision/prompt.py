"""The one prompt builder and the one answer parser, both driven by the run's :class:`PromptFormat`.

Training formats answers with :func:`format_answer`; evaluation, predict and serve read them back with
:func:`parse_answer` and the same format. Keeping both here means a change to the answer template cannot drift
between the two, and a template that could not be read back is refused when the format is made.
"""

from __future__ import annotations

import functools
import math
import re
import string
from dataclasses import asdict, dataclass

DEFAULT_QUESTION = "What is shown in this image?"
DEFAULT_ANSWER_TEMPLATE = "Product: {title}, Category: {category}, Full Price: {full_price}"
END_TAG = "<|end|>"
ANSWER_FIELDS = ("title", "category", "full_price")


@dataclass(frozen=True)
class PromptFormat:
    """The exchange the model is trained on: one user turn with the image, one assistant answer.

    ``answer_template`` holds ``{title}``, ``{category}`` and ``{full_price}`` once each, with fixed text around
    them; it is checked on creation (:func:`answer_template_parts`) and raises ValueError if the parser could
    not read its own answers back.
    """

    question: str = DEFAULT_QUESTION
    answer_template: str = DEFAULT_ANSWER_TEMPLATE

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question: must be non-empty text")
        answer_template_parts(self.answer_template)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> PromptFormat:
        data = dict(data or {})
        unknown = set(data) - {"question", "answer_template"}
        if unknown:
            raise ValueError(f"unknown prompt keys: {sorted(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------- prices

_CURRENCY = re.compile(r"(?i)\b(?:usd|eur|gbp|jpy|cny|rmb|chf|cad|aud|hkd|sgd|krw|inr|us)\b|[$€£¥₩₹]")
_NUMBER = re.compile(r"\d[\d.,'\s]*")


def format_price(price: float) -> str:
    """Prices as the cookbook writes them (``1290.0``), rounded to cents."""
    return str(round(float(price), 2))


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


# ------------------------------------------------------------------------------------------ templates

# Answers every template must read back exactly: titles with commas, hyphens, digits, brackets and every
# letter, categories with spaces and symbols, whole and fractional prices.
_ROUND_TRIP_SAMPLES = (
    ("Check Cotton Shirt", "shirts", 1290.0),
    ("Slim Fit T-Shirt, Navy (2 pack)", "t-shirts", 45.5),
    ("Bag", "Boxes & Luggage", 7.0),
    ("The Quick Brown Fox Jumps Over 12 Lazy Dogs", "toys", 19.99),
)


@dataclass(frozen=True)
class TemplateParts:
    """An answer template split into fixed text and fields: ``literals[0] fields[0] literals[1] ... literals[3]``."""

    literals: tuple[str, ...]  # four pieces of fixed text (the outer two may be empty)
    fields: tuple[str, ...]  # the three field names in template order

    def literal_after(self, field: str) -> str:
        return self.literals[self.fields.index(field) + 1]

    def literal_before(self, field: str) -> str:
        return self.literals[self.fields.index(field)]


@functools.lru_cache(maxsize=64)
def answer_template_parts(template: str) -> TemplateParts:
    """Split and check an answer template; ValueError with a clear message if it cannot be used.

    The template must hold ``{title}``, ``{category}`` and ``{full_price}`` once each, no other field, no format
    spec, fixed text with a visible character between two fields, and read back every sample answer exactly.
    """
    if not isinstance(template, str):
        raise ValueError(f"answer_template must be text, got {type(template).__name__}")
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"answer_template {template!r}: {err} (write a literal brace as {{{{ or }}}})"
        ) from err
    literals, fields = [""], []
    for literal, name, spec, conversion in pieces:
        literals[-1] += literal
        if name is None:
            continue
        if name not in ANSWER_FIELDS:
            shown = "{" + name + "}" if name else "{}"
            raise ValueError(
                f"answer_template {template!r}: unknown field {shown}; the fields are {{title}}, {{category}} "
                "and {full_price}"
            )
        if spec or conversion:
            raise ValueError(
                f"answer_template {template!r}: write {{{name}}} without a format spec or conversion"
            )
        if name in fields:
            raise ValueError(f"answer_template {template!r}: {{{name}}} appears more than once")
        fields.append(name)
        literals.append("")
    missing = [name for name in ANSWER_FIELDS if name not in fields]
    if missing:
        shown = ", ".join("{" + name + "}" for name in missing)
        raise ValueError(
            f"answer_template {template!r}: lacks {shown} (it needs {{title}}, {{category}}, {{full_price}})"
        )
    for left, right, between in zip(fields[:-1], fields[1:], literals[1:3], strict=True):
        if not between.strip():
            raise ValueError(
                f"answer_template {template!r}: {{{left}}} and {{{right}}} need fixed text between them "
                "(e.g. ', ' or ' | '), or the answer cannot be split back into its fields"
            )
    parts = TemplateParts(tuple(literals), tuple(fields))
    for title, category, price in _ROUND_TRIP_SAMPLES:
        answer = template.format(title=title, category=category, full_price=format_price(price))
        parsed = _parse_with(parts, answer)
        if parsed != ParsedAnswer(title, category, price):
            raise ValueError(
                f"answer_template {template!r}: cannot be parsed back: the answer {answer!r} reads as "
                f"title={parsed.title!r}, category={parsed.category!r}, price={parsed.price!r}; use fixed text "
                "between the fields that titles and prices do not contain"
            )
    return parts


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


_SPECIAL = re.compile(r"<\|[a-z0-9_]+\|>|</?s>")
_SEPARATORS = " \t,;|:=-–—/.·"  # characters that separate a field from the words that label the next one
# Free text in one field: titles may contain anything but a line break; the title is the one field matched
# greedily, so separator text inside a title stays in the title (categories and prices rarely hold it).
_FIELD_PATTERN = {"title": r"[^\n]+", "category": r"[^\n]+?", "full_price": r"[^\n]+?"}


def _literal_pattern(text: str) -> str:
    """Fixed text as a regex: case-insensitive (via the flags), any run of whitespace matching any other, and
    whitespace at either end optional."""
    words = text.split()
    if not words:
        return r"\s*"
    return r"\s*" + r"\s+".join(re.escape(word) for word in words) + r"\s*"


@functools.lru_cache(maxsize=64)
def _answer_regex(parts: TemplateParts, optional_ends: bool) -> re.Pattern:
    """The whole answer as one regex; ``optional_ends`` lets the fixed text before the first and after the last
    field be missing (a model that drops ``Product:`` or a trailing ``USD``)."""
    pattern = []
    for i, literal in enumerate(parts.literals):
        piece = _literal_pattern(literal)
        if optional_ends and i in (0, len(parts.literals) - 1) and literal.strip():
            piece = f"(?:{piece})?"
        pattern.append(piece)
        if i < len(parts.fields):
            name = parts.fields[i]
            pattern.append(f"(?P<{name}>{_FIELD_PATTERN[name]})")
    return re.compile(r"\s*" + "".join(pattern) + r"\s*", re.IGNORECASE)


def _label(literal: str) -> str:
    """The words that introduce a field (``, Category: `` -> ``Category:``; `` | `` -> nothing)."""
    return literal.strip().lstrip(_SEPARATORS).strip()


@functools.lru_cache(maxsize=64)
def _label_regex(parts: TemplateParts) -> re.Pattern | None:
    """Finds the fields' labels anywhere in an answer, for answers whose fields come in another order."""
    alternatives = []
    for name in parts.fields:
        label = _label(parts.literal_before(name))
        if label:
            boundary = r"(?!\w)" if label[-1].isalnum() else ""
            alternatives.append(f"(?P<{name}>{_literal_pattern(label)}{boundary})")
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")\s*", re.IGNORECASE)


def _clean_field(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().strip(",;|").strip()
    return value or None


def _to_parsed(found: dict[str, str | None]) -> ParsedAnswer:
    price_text = _clean_field(found.get("full_price"))
    return ParsedAnswer(
        title=_clean_field(found.get("title")),
        category=_clean_field(found.get("category")),
        price=parse_price(price_text) if price_text else None,
    )


def _by_labels(parts: TemplateParts, text: str) -> dict[str, str | None]:
    """Each labelled field's value runs from its label to the next label, its own closing text or the line's end;
    a field given twice keeps its first value."""
    regex = _label_regex(parts)
    if regex is None:
        return {}
    matches = list(regex.finditer(text))
    found: dict[str, str | None] = {}
    for i, match in enumerate(matches):
        name = next(k for k in parts.fields if match.group(k) is not None)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = text[match.end() : end].split("\n")[0]
        closing = parts.literal_after(name).strip()
        if closing and name == parts.fields[-1]:
            cut = value.lower().rfind(closing.lower())
            value = value[:cut] if cut >= 0 else value
        found.setdefault(name, value)
    return found


def _by_prefix(parts: TemplateParts, text: str) -> dict[str, str | None]:
    """For an answer cut short: the template's leading fields, in order, as far as the answer goes.

    The last field found ends at the next separator's first visible character (or the line's end). Needs the
    answer's opening fixed text, or at least one separator, so a line of unrelated text yields nothing.
    """
    for count in range(len(parts.fields) - 1, 0, -1):
        opening = parts.literals[0]
        if count == 1 and not opening.strip():
            break
        pattern = [_literal_pattern(opening)]
        for i in range(count):
            if i:
                pattern.append(_literal_pattern(parts.literals[i]))
            pattern.append(f"(?P<{parts.fields[i]}>{_FIELD_PATTERN[parts.fields[i]]})")
        stop = re.escape(parts.literals[count].strip()[0])
        pattern[-1] = f"(?P<{parts.fields[count - 1]}>[^\\n]+?)"
        pattern.append(rf"(?:\s*{stop}[^\n]*)?(?:\n|$)")
        match = re.match("".join(pattern), text, re.IGNORECASE)
        if match:
            return match.groupdict()
    return {}


def _parse_with(parts: TemplateParts, text: str) -> ParsedAnswer:
    lines = sum(literal.count("\n") for literal in parts.literals) + 1
    head = "\n".join(text.strip().split("\n")[:lines])
    for candidate, optional_ends in ((text, False), (head, False), (head, True)):
        match = _answer_regex(parts, optional_ends).fullmatch(candidate)
        if match:
            parsed = _to_parsed(match.groupdict())
            if parsed.complete:
                return parsed
    found = _by_labels(parts, text)
    for name, value in _by_prefix(parts, text).items():
        if _clean_field(found.get(name)) is None:
            found[name] = value
    return _to_parsed(found)


def prompt_text(fmt: PromptFormat = PromptFormat(), num_images: int = 1) -> str:
    """The user turn up to and including the assistant tag, exactly as trained:
    ``<|user|>\\n<|image_1|>What is shown in this image?<|end|><|assistant|>\\n``."""
    tags = "".join(f"<|image_{i}|>" for i in range(1, num_images + 1))
    return f"<|user|>\n{tags}{fmt.question}{END_TAG}<|assistant|>\n"


def format_answer(fmt: PromptFormat, title: str, category: str, full_price: float) -> str:
    """The assistant's answer for one product (without the closing ``<|end|>``, which the processor adds)."""
    return fmt.answer_template.format(title=title, category=category, full_price=format_price(full_price))


def parse_answer(text: object, fmt: PromptFormat = PromptFormat()) -> ParsedAnswer:
    """Read title, category and price back from a model's answer, following ``fmt.answer_template``. Never raises.

    An answer that follows the template is split exactly (the title may contain the separators: it is the one
    field matched greedily). Near misses are still read where it is safe: fields in another order (found by the
    words that introduce them, e.g. ``Category:``), a missing leading or trailing fixed text, other spacing or
    case, a price with a currency sign, and an answer cut short keeps the fields it completed.
    """
    if not isinstance(text, str):
        return ParsedAnswer(None, None, None)
    text = _SPECIAL.split(text, maxsplit=1)[0] if END_TAG in text else _SPECIAL.sub(" ", text)
    try:
        return _parse_with(answer_template_parts(fmt.answer_template), text)
    except ValueError:  # a template that slipped past validation must not crash scoring
        return ParsedAnswer(None, None, None)
