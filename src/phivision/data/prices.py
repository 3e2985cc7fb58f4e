"""THE catalog price parser: the prices of a product table, read right or dropped with a reason.

Separate from the answer parser (:func:`phivision.answer.prompt.parse_price`), which reads a model's answer and may be
lenient. A catalog price becomes a training label, so this parser never guesses and never changes a magnitude:

* currency symbols and codes may stand on either side (``$1,290.00``, ``1.290,00 €``, ``USD 1290``, ``R$ 10``);
* thousands separators of every common locale: ``,`` ``.`` space, no-break space, ``'`` (Swiss) and the Indian
  lakh grouping ``1,00,000.00``; a decimal point or a decimal comma; ``1290,-`` means no cents;
* a number with two valid readings (``1.290`` and ``1,290`` are 1290 or 1.29) is read with the column's decimal
  convention: ``decimal_comma`` when given, else the majority of the column's unambiguous values (see
  :func:`decide_convention`), else it is dropped as ``ambiguous_price``;
* negative (``-5``), accounting-negative (``(45.00)``), exponent (``1e3``), non-finite (``inf``), zero and absurd
  (above ``max_price``) values are dropped, each with its own reason, as is anything that is not one number.

Reasons: ``missing_price``, ``bad_price``, ``negative_price``, ``parenthesised_price``, ``exponent_price``,
``non_finite_price``, ``zero_price``, ``absurd_price``, ``ambiguous_price``.
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from phivision.args import MAX_PRICE
from phivision.options import plain

# values that catalogs put where a field is unknown
PLACEHOLDERS = frozenset(
    [
        "",
        "n.a.",
        "n.a",
        "na",
        "n/a",
        "#n/a",
        "none",
        "null",
        "nan",
        "-",
        "--",
        "missing",
        "no image",
        "tbd",
        "?",
    ]
)
# ISO 4217 codes of the currencies catalogs are priced in (matched case-insensitively)
CURRENCY_CODES = frozenset(
    [
        "usd",
        "eur",
        "gbp",
        "jpy",
        "cny",
        "rmb",
        "chf",
        "cad",
        "aud",
        "nzd",
        "hkd",
        "sgd",
        "krw",
        "inr",
        "sek",
        "nok",
        "dkk",
        "pln",
        "czk",
        "huf",
        "ron",
        "bgn",
        "rub",
        "uah",
        "try",
        "ils",
        "aed",
        "sar",
        "qar",
        "kwd",
        "bhd",
        "omr",
        "jod",
        "egp",
        "zar",
        "ngn",
        "kes",
        "mxn",
        "brl",
        "ars",
        "clp",
        "cop",
        "pen",
        "uyu",
        "thb",
        "vnd",
        "idr",
        "myr",
        "php",
        "twd",
        "pkr",
        "lkr",
        "bdt",
        "isk",
        "hrk",
        "rsd",
        "kzt",
        "gel",
        "mad",
        "tnd",
    ]
)
# symbols and local abbreviations, lower case; "$"-prefixed forms name their country
CURRENCY_SIGNS = frozenset(
    [
        "$",
        "€",
        "£",
        "¥",
        "₩",
        "₹",
        "₽",
        "₺",
        "₪",
        "₫",
        "฿",
        "₴",
        "₦",
        "₱",
        "₡",
        "₲",
        "₵",
        "₸",
        "₼",
        "₾",
        "¢",
        "₨",
        "元",
        "円",
        "원",
        "us$",
        "u$s",
        "c$",
        "ca$",
        "a$",
        "au$",
        "hk$",
        "nz$",
        "s$",
        "sg$",
        "r$",
        "mx$",
        "mex$",
        "nt$",
        "rd$",
        "kr",
        "kr.",
        "kč",
        "zł",
        "zl",
        "ft",
        "lei",
        "rs",
        "rs.",
        "fr.",
        "fr",
        "sfr.",
        "chf.",
        "rm",
        "rp",
        "tl",
        "dh",
        "dhs",
        "руб",
        "руб.",
        "р.",
        "лв",
        "лв.",
        "din",
        "din.",
        "ден",
        "kn",
    ]
)
# currencies without minor units (ISO 4217 exponent 0), by code and unambiguous sign (not ¥: CNY has cents)
ZERO_DECIMAL_CURRENCIES = frozenset(
    ["jpy", "krw", "vnd", "clp", "isk", "pyg", "ugx", "xaf", "xof", "kmf", "rwf", "円", "₩", "원", "₫"]
)
SPACES = "\u00a0\u202f\u2007\u2009\u200a\u2008\u2006\u2005\u2004\u2003\u2002\u2000 \t"
MINUS_SIGNS = "-\u2212\u2012\u2013\u2014\ufe63\uff0d"
NON_FINITE = frozenset(["inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", "∞", "+∞", "-∞"])

_UNIFY = str.maketrans(
    {**dict.fromkeys(SPACES, " "), **dict.fromkeys(MINUS_SIGNS, "-"), "\u2019": "'", "\u02bc": "'"}
)
_EXPONENT = re.compile(r"\d\s*[eE]\s*[+-]?\d")
_NO_CENTS = re.compile(r"(\d)[.,][-\u2013\u2014]{1,2}(?=\D*$)")  # 1290,- and CHF 1'290.– (no cents)
_SHAPE = re.compile(r"(?P<pre>[^\d]*?)(?P<num>\d[\d.,' ]*)(?P<post>[^\d]*)")


@dataclass(frozen=True)
class Price:
    """One cell read: ``value`` (a positive finite float) or ``reason`` (why the row is dropped) and ``detail``."""

    value: float | None
    reason: str | None = None
    detail: str = ""
    evidence: str | None = None  # "comma" / "point": the cell shows which decimal mark its column uses


@dataclass(frozen=True)
class Convention:
    """A column's decimal mark: ``decimal_comma`` True/False, or None when undecided; how it was decided and
    the evidence (cells readable only one way) that decided it."""

    decimal_comma: bool | None
    decided_by: str  # "flag", "majority" or "undecided"
    comma: int = 0
    point: int = 0

    def describe(self) -> dict:
        mark = {True: "comma", False: "point", None: "undecided"}[self.decimal_comma]
        return {
            "decimal": mark,
            "decided_by": self.decided_by,
            "evidence": {"comma": self.comma, "point": self.point},
        }


def cell_text(value: object) -> str | None:
    """A table cell as clean text, or None when empty or a placeholder such as ``N.A.``."""
    value = plain(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a code read as 1234.0 is "1234"
    text = str(value).strip()
    return None if text.lower() in PLACEHOLDERS else text


def read_price(
    value: object,
    decimal_comma: bool | None = None,
    max_price: float = MAX_PRICE,
    currency: str | None = None,
) -> Price:
    """Read one catalog cell. ``decimal_comma`` settles numbers with two readings (``1.290``); None drops them.
    ``currency`` (the row's currency code) rules out impossible readings: yen and won have no decimals, so
    ``JPY 129,000`` is 129000 whatever the convention. Never raises."""
    value = plain(value)
    if value is None:
        return Price(None, "missing_price")
    if isinstance(value, bool):
        return Price(None, "bad_price", f"{value!r} is not a price")
    if isinstance(value, (numbers.Real, decimal.Decimal)):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            return Price(None, "absurd_price", f"{str(value)[:30]}... is beyond any price")
        if math.isinf(number) and isinstance(value, decimal.Decimal) and value.is_finite():
            return Price(None, "absurd_price", f"{value} is beyond any price")
        return _checked(number, max_price, str(value))
    if isinstance(value, numbers.Number):  # complex
        return Price(None, "bad_price", f"{value!r} is not a price")
    try:
        text = unicodedata.normalize("NFKC", str(value)).strip(SPACES)
    except Exception:  # an object whose str() fails
        return Price(None, "bad_price", "unreadable value")
    return _read_text(text, decimal_comma, float(max_price), None if currency is None else str(currency))


@functools.lru_cache(maxsize=65536)  # a catalog repeats its price strings: read each once
def _read_text(text: str, decimal_comma: bool | None, max_price: float, currency: str | None) -> Price:
    shown = repr(text)
    lowered = text.lower()
    if lowered in PLACEHOLDERS:
        return Price(None, "missing_price", shown if text else "")
    if lowered.replace(" ", "") in NON_FINITE:
        return Price(None, "non_finite_price", shown)
    if _EXPONENT.search(text):
        return Price(None, "exponent_price", f"{shown}: exponent notation")
    text = _NO_CENTS.sub(r"\1", text).translate(_UNIFY)
    shape = _SHAPE.fullmatch(text)
    if shape is None:
        return Price(None, "bad_price", f"{shown}: not one number")
    pre, post = shape["pre"], shape["post"]
    number = shape["num"].strip().rstrip(".,").strip()
    opened, closed = "(" in pre, ")" in post
    negative = "-" in pre or post.strip().startswith("-")
    for part in (
        pre.replace("(", " ").replace("-", " ").replace("+", " "),
        post.replace(")", " ").replace("-", " "),
    ):
        if not all(token in CURRENCY_CODES or token in CURRENCY_SIGNS for token in part.lower().split()):
            return Price(None, "bad_price", f"{shown}: {part.strip()!r} is not a currency")
    if opened or closed:
        if opened and closed:
            return Price(None, "parenthesised_price", f"{shown}: parentheses mark a negative amount")
        return Price(None, "bad_price", f"{shown}: unbalanced parenthesis")
    if negative:
        return Price(None, "negative_price", shown)
    readings = _readings(number)
    if not readings:
        return Price(None, "bad_price", f"{shown}: not a number in any locale's format")
    evidence = next(iter(readings)) if len(readings) == 1 and ("," in number or "." in number) else None
    markers = {t for t in (pre + " " + post).lower().split()} | {str(currency or "").strip().lower()}
    if markers & ZERO_DECIMAL_CURRENCIES:  # no cents exist: a reading with a fraction is impossible
        readings = {k: v for k, v in readings.items() if v[1] == 0} or readings
    values = {v for v, _ in readings.values()}
    if len(values) > 1:
        if decimal_comma is None:
            return Price(
                None,
                "ambiguous_price",
                f"{shown} reads as {readings['point'][0]:g} or {readings['comma'][0]:g}; pass --decimal-comma or "
                "--decimal-point",
            )
        value = readings["comma" if decimal_comma else "point"][0]
    else:
        value = values.pop()
    checked = _checked(value, max_price, shown)
    return Price(checked.value, checked.reason, checked.detail, evidence)


def _checked(value: float, max_price: float, shown: str) -> Price:
    if math.isnan(value):
        return Price(None, "missing_price")
    if math.isinf(value):
        return Price(None, "non_finite_price", shown)
    if value < 0:
        return Price(None, "negative_price", shown)
    if value == 0:
        return Price(None, "zero_price", shown)
    if value > max_price:
        return Price(None, "absurd_price", f"{shown} is above the largest price accepted ({max_price:g})")
    return Price(value)


def _readings(number: str) -> dict[str, tuple[float, int]]:
    """The valid readings of a number made of digits and separators: ``{"point": (value, fraction digits)}``
    with ``.`` as the decimal mark, ``{"comma": ...}`` with ``,``; both when both are valid."""
    tokens = re.findall(r"\d+|[.,' ]+", number)
    if any(len(t) > 1 for t in tokens if not t.isdigit()):
        return {}  # two separators in a row ("1,,290", "1 . 290")
    found = {}
    for name, decimal_mark in (("point", "."), ("comma", ",")):
        reading = _read_with(tokens, decimal_mark)
        if reading is not None:
            found[name] = reading
    return found


def _read_with(tokens: list[str], decimal_mark: str) -> tuple[float, int] | None:
    """``tokens`` (digit runs and single separators) read with ``decimal_mark`` as the decimal mark, or None."""
    fraction = ""
    if len(tokens) >= 3 and tokens[-2] == decimal_mark:
        fraction, tokens = tokens[-1], tokens[:-2]
    groups, separators = tokens[0::2], set(tokens[1::2])
    if decimal_mark in separators or len(separators) > 1:
        return None  # the decimal mark twice, or two different thousands separators
    if separators and not _grouped(groups):
        return None
    try:
        return float("".join(groups) + ("." + fraction if fraction else "")), len(fraction)
    except ValueError:
        return None


def _grouped(groups: list[str]) -> bool:
    """Thousands groups: 1-3 digits (not starting with 0) then groups of 3 (Western), or groups of 2 then a last
    group of 3 (Indian lakh/crore: 1,00,000)."""
    first, rest = groups[0], groups[1:]
    if not 1 <= len(first) <= 3 or (first.startswith("0") and len(groups) > 1):
        return False
    if all(len(g) == 3 for g in rest):
        return True
    return len(first) <= 2 and len(rest) >= 2 and all(len(g) == 2 for g in rest[:-1]) and len(rest[-1]) == 3


def decide_convention(values: Iterable[object], decimal_comma: bool | None = None) -> Convention:
    """The decimal mark of a column: ``decimal_comma`` when given (``flag``), else the majority of the cells that
    read only one way (``12,50`` and ``1.290,00`` vote comma; ``12.50`` and ``1,290.00`` vote point); a tie,
    or no such cell, leaves it ``undecided`` (its ambiguous cells are then dropped)."""
    votes = {"comma": 0, "point": 0}
    for value in values:
        evidence = read_price(value).evidence
        if evidence:
            votes[evidence] += 1
    if decimal_comma is not None:
        return Convention(decimal_comma, "flag", votes["comma"], votes["point"])
    if votes["comma"] == votes["point"]:
        return Convention(None, "undecided", votes["comma"], votes["point"])
    return Convention(votes["comma"] > votes["point"], "majority", votes["comma"], votes["point"])


def read_price_column(
    values: Sequence[object], decimal_comma: bool | None = None, max_price: float = MAX_PRICE
) -> tuple[list[Price], Convention]:
    """Read a whole price column with one decimal convention (see :func:`decide_convention`)."""
    convention = decide_convention(values, decimal_comma)
    return [read_price(v, convention.decimal_comma, max_price) for v in values], convention
