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


def _literal_regex(text: str) -> re.Pattern | None:
    """Fixed text as a regex over its visible words: case-insensitive, any run of whitespace matching any other.
    None for text that is only whitespace (field values are stripped, so it needs no matching)."""
    words = text.split()
    if not words:
        return None
    return re.compile(r"\s+".join(re.escape(word) for word in words), re.IGNORECASE)


def _occurrences(literal: re.Pattern, text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Every (start, end) where ``literal`` matches inside ``text[start:end]``, overlapping ones included."""
    found = []
    pos = start
    while True:
        match = literal.search(text, pos, end)
        if match is None:
            return found
        found.append(match.span())
        pos = match.start() + 1


@functools.lru_cache(maxsize=64)
def _compiled(parts: TemplateParts) -> tuple[re.Pattern | None, ...]:
    return tuple(_literal_regex(literal) for literal in parts.literals)


def _split(parts: TemplateParts, text: str, optional_ends: bool) -> dict[str, str] | None:
    """Split a whole answer into its fields along the template, or None if it does not follow the template.

    ``optional_ends`` lets the fixed text before the first and after the last field be missing (a model that
    drops ``Product:`` or a trailing ``USD``). Where a separator occurs more than once, the title takes the
    extra text (titles hold separators far more often than categories or prices do). Linear in the number of
    separator occurrences squared, never exponential (no backtracking regex).
    """
    opening, first, second, closing = _compiled(parts)
    lo, hi = 0, len(text)
    if opening is not None:
        match = opening.match(text)
        if match:
            lo = match.end()
        elif not optional_ends:
            return None
    if closing is not None:
        ends = [span for span in _occurrences(closing, text, lo, hi) if span[1] == hi]
        if ends:
            hi = ends[0][0]
        elif not optional_ends:
            return None
    title_at = parts.fields.index("title")
    firsts = _occurrences(first, text, lo, hi)
    seconds = _occurrences(second, text, lo, hi)
    # The title field prefers the longest text, the others the shortest: try separator positions in that order.
    firsts.sort(reverse=title_at == 0)
    seconds.sort(reverse=title_at == 1)
    for a_start, a_end in firsts:
        for b_start, b_end in seconds:
            if b_start < a_end:
                continue
            values = (text[lo:a_start], text[a_end:b_start], text[b_end:hi])
            if all(v.strip() and "\n" not in v.strip() for v in values):
                return dict(zip(parts.fields, values, strict=True))
    return None


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
            words = r"\s+".join(re.escape(word) for word in label.split())
            alternatives.append(f"(?P<{name}>{words}{boundary})")
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + ")", re.IGNORECASE)


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


def _cut_partial_literal(value: str, literal: str) -> str:
    """Drop a tail of ``value`` that is the start of ``literal`` (an answer cut off inside a separator:
    ``bags, pri`` before ``, priced at ``)."""
    target = " ".join(literal.split()).casefold()
    if not target:
        return value
    for i in range(max(0, len(value) - 2 * len(literal) - 2), len(value)):
        tail = " ".join(value[i:].split()).casefold()
        if tail and target.startswith(tail) and not value[i].isalnum():
            return value[:i]
    return value


def _by_labels(parts: TemplateParts, text: str) -> dict[str, str | None]:
    """Each labelled field's value runs from its label to the next label or the line's end, less its own
    closing text; a field given twice keeps its first value."""
    regex = _label_regex(parts)
    if regex is None:
        return {}
    matches = list(regex.finditer(text))
    found: dict[str, str | None] = {}
    for i, match in enumerate(matches):
        name = next(k for k in parts.fields if match.group(k) is not None)
        if name in found:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = text[match.end() : end].split("\n")[0]
        closing = parts.literal_after(name).strip()
        if closing and name == parts.fields[-1]:
            cut = value.casefold().rfind(closing.casefold())
            value = value[:cut] if cut >= 0 else value
        found[name] = _cut_partial_literal(value, parts.literal_after(name))
    return found


def _by_prefix(parts: TemplateParts, text: str) -> dict[str, str | None]:
    """For an answer cut short: the template's leading fields, in order, as far as the answer's first line goes.

    Needs the answer's opening fixed text, or at least one separator, so a line of unrelated text yields nothing.
    """
    opening, first = _compiled(parts)[:2]
    line = text.strip().split("\n")[0]
    lo = 0
    if opening is not None:
        match = opening.match(line)
        lo = match.end() if match else 0
    seps = _occurrences(first, line, lo, len(line))
    if seps:
        # The title (greedy) ends at the last separator on the line, another first field at the first one.
        a_start, a_end = seps[-1] if parts.fields[0] == "title" else seps[0]
        if line[lo:a_start].strip():
            rest = _cut_partial_literal(line[a_end:], parts.literals[2])
            return {parts.fields[0]: line[lo:a_start], parts.fields[1]: rest}
    if lo:  # the opening fixed text is there: the first field is the rest of the line
        return {parts.fields[0]: _cut_partial_literal(line[lo:], parts.literals[1])}
    return {}


def _parse_with(parts: TemplateParts, text: str) -> ParsedAnswer:
    lines = sum(literal.count("\n") for literal in parts.literals) + 1
    text = text.strip()
    head = "\n".join(text.split("\n")[:lines]).strip()
    for candidate, optional_ends in ((text, False), (head, False), (head, True)):
        found = _split(parts, candidate, optional_ends)
        if found is not None:
            parsed = _to_parsed(found)
            if parsed.complete:
                return parsed
    found = _by_labels(parts, text)
    for name, value in _by_prefix(parts, text).items():
        if _clean_field(found.get(name)) is None:
            found[name] = value
    return _to_parsed(found)


def prompt_text(fmt: PromptFormat = PromptFormat(), num_images: int = 1) -> str:
    """The user turn up to and including the assistant tag, exactly as trained:
    ``<|user|>\\n<|image_1|>What is shown in this image?<|end|><|assistant|>\\n``.

    With several photos the tags come first, in order, one per line as in Microsoft's multi-image examples, the
    question right after the last: ``<|user|>\\n<|image_1|>\\n<|image_2|>What is...``. One photo gives the
    cookbook's prompt unchanged; none gives the text-only turn (the question alone).
    """
    if num_images < 0:
        raise ValueError(f"num_images must be 0 or more, got {num_images}")
    tags = "\n".join(f"<|image_{i}|>" for i in range(1, num_images + 1))
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
