"""The catalog price parser: a table of price strings from many locales, each with its value or drop reason."""

from __future__ import annotations

import decimal
import math

import numpy as np
import pytest

from phivision.data.prices import decide_convention, plain, read_price, read_price_column

NBSP, NNBSP = "\u00a0", "\u202f"

# (cell, value with no convention, value with --decimal-comma, value with --decimal-point); a str is a reason
LOCALES = [
    # en-US, en-GB, en-CA, en-AU: decimal point, comma thousands
    ("$1,290.00", 1290.0, 1290.0, 1290.0),
    ("$1,290", "ambiguous_price", 1.29, 1290.0),
    ("US$ 1,290.50", 1290.5, 1290.5, 1290.5),
    ("£45", 45.0, 45.0, 45.0),
    ("45.00 GBP", 45.0, 45.0, 45.0),
    ("C$ 12.99", 12.99, 12.99, 12.99),
    ("USD 1290.5", 1290.5, 1290.5, 1290.5),
    ("1290 EUR", 1290.0, 1290.0, 1290.0),
    ("$12,345,678.90", 12345678.9, 12345678.9, 12345678.9),
    # de-DE, es-ES, it-IT, nl-NL, pt-BR, tr-TR: decimal comma, dot thousands
    ("1.290,00 €", 1290.0, 1290.0, 1290.0),
    ("€ 1.290", "ambiguous_price", 1290.0, 1.29),
    ("1.290", "ambiguous_price", 1290.0, 1.29),
    ("1.290.000", 1290000.0, 1290000.0, 1290000.0),
    ("R$ 1.290,90", 1290.9, 1290.9, 1290.9),
    ("12,5", 12.5, 12.5, 12.5),
    ("0,50 €", 0.5, 0.5, 0.5),
    ("1290,-", 1290.0, 1290.0, 1290.0),
    ("₺1.290,00", 1290.0, 1290.0, 1290.0),
    # fr-FR, sv-SE, pl-PL, ru-RU, cs-CZ, hu-HU: space (no-break space, narrow no-break space) thousands
    (f"1{NNBSP}290,00{NBSP}€", 1290.0, 1290.0, 1290.0),
    (f"1{NBSP}290 kr", 1290.0, 1290.0, 1290.0),
    ("1 290,00 zł", 1290.0, 1290.0, 1290.0),
    ("1 290,00 ₽", 1290.0, 1290.0, 1290.0),
    ("12 990 Kč", 12990.0, 12990.0, 12990.0),
    ("129 000 Ft", 129000.0, 129000.0, 129000.0),
    # de-CH: apostrophe thousands, ".–" for no cents
    ("CHF 1'290.50", 1290.5, 1290.5, 1290.5),
    ("CHF 1’290.–", 1290.0, 1290.0, 1290.0),
    # en-IN: lakh grouping
    ("₹1,00,000.00", 100000.0, 100000.0, 100000.0),
    ("Rs. 12,34,567", 1234567.0, 1234567.0, 1234567.0),
    # ja-JP, ko-KR: no minor unit, so a comma can only group thousands
    ("129,000円", 129000.0, 129000.0, 129000.0),
    ("₩1,290,000", 1290000.0, 1290000.0, 1290000.0),
    ("¥129,000", "ambiguous_price", 129.0, 129000.0),  # ¥ is also the yuan, which has cents
    # full-width digits (NFKC)
    ("１２９０", 1290.0, 1290.0, 1290.0),
    # dropped, each with its reason: never a silent change of magnitude
    ("-5", "negative_price", "negative_price", "negative_price"),
    ("−45.00 €", "negative_price", "negative_price", "negative_price"),
    ("45-", "negative_price", "negative_price", "negative_price"),
    ("(45.00)", "parenthesised_price", "parenthesised_price", "parenthesised_price"),
    ("$(1,290.00)", "parenthesised_price", "parenthesised_price", "parenthesised_price"),
    ("1e3", "exponent_price", "exponent_price", "exponent_price"),
    ("1.5E+02", "exponent_price", "exponent_price", "exponent_price"),
    ("inf", "non_finite_price", "non_finite_price", "non_finite_price"),
    ("-Infinity", "non_finite_price", "non_finite_price", "non_finite_price"),
    ("99999999999999999999", "absurd_price", "absurd_price", "absurd_price"),
    ("0", "zero_price", "zero_price", "zero_price"),
    ("$0.00", "zero_price", "zero_price", "zero_price"),
    ("free", "bad_price", "bad_price", "bad_price"),
    ("10-20", "bad_price", "bad_price", "bad_price"),
    ("$10 / $12", "bad_price", "bad_price", "bad_price"),
    ("approx. 100", "bad_price", "bad_price", "bad_price"),
    ("1,234,56", "bad_price", "bad_price", "bad_price"),
    ("1,,290", "bad_price", "bad_price", "bad_price"),
    ("(45", "bad_price", "bad_price", "bad_price"),
    ("N.A.", "missing_price", "missing_price", "missing_price"),
    ("", "missing_price", "missing_price", "missing_price"),
    ("nan", "missing_price", "missing_price", "missing_price"),
]


def expect(cell, expected, decimal_comma):
    price = read_price(cell, decimal_comma)
    if isinstance(expected, str):
        assert (price.value, price.reason) == (None, expected), cell
    else:
        assert price.reason is None and price.value == pytest.approx(expected, rel=1e-12), cell


@pytest.mark.parametrize(("cell", "undecided", "comma", "point"), LOCALES)
def test_locale_price_table(cell, undecided, comma, point):
    expect(cell, undecided, None)
    expect(cell, comma, True)
    expect(cell, point, False)


@pytest.mark.parametrize(
    ("cell", "reason_or_value"),
    [
        (1290, 1290.0),
        (np.int64(1290), 1290.0),
        (np.float64(12.5), 12.5),
        (decimal.Decimal("1290.50"), 1290.5),
        (-3, "negative_price"),
        (np.float64(-3.0), "negative_price"),
        (0.0, "zero_price"),
        (math.inf, "non_finite_price"),
        (math.nan, "missing_price"),
        (None, "missing_price"),
        (True, "bad_price"),
        (1e30, "absurd_price"),
        (10**400, "absurd_price"),
        (decimal.Decimal("1e400"), "absurd_price"),
    ],
)
def test_numeric_cells(cell, reason_or_value):
    expect(cell, reason_or_value, None)


def test_messages_show_plain_values_never_numpy_reprs():
    price = read_price(np.float64(-3.0))
    assert price.detail == "-3.0" and "np." not in price.detail
    assert plain(np.int64(7)) == 7 and type(plain(np.int64(7))) is int


def test_currency_without_cents_settles_a_comma():
    assert read_price("129,000", currency="JPY").value == 129000.0
    assert read_price("1.290", currency="KRW").value == 1290.0
    assert read_price("1.290", currency="USD").reason == "ambiguous_price"


def test_the_column_majority_decides_ambiguous_cells_and_says_so():
    european = ["1.290,00 €", "12,50 €", "1.290 €", "990 €"]
    prices, convention = read_price_column(european)
    assert convention.describe() == {
        "decimal": "comma",
        "decided_by": "majority",
        "evidence": {"comma": 2, "point": 0},
    }
    assert [p.value for p in prices] == [1290.0, 12.5, 1290.0, 990.0]

    american = ["$1,290.00", "$12.50", "$1,290"]
    prices, convention = read_price_column(american)
    assert convention.decimal_comma is False and [p.value for p in prices] == [1290.0, 12.5, 1290.0]

    undecided = ["1.290", "2.450", "990"]
    prices, convention = read_price_column(undecided)
    assert convention.describe()["decimal"] == "undecided"
    assert [p.reason for p in prices] == ["ambiguous_price", "ambiguous_price", None]

    prices, convention = read_price_column(undecided, decimal_comma=True)
    assert convention.decided_by == "flag" and [p.value for p in prices] == [1290.0, 2450.0, 990.0]


def test_a_tie_leaves_the_convention_undecided():
    assert decide_convention(["12,5", "12.5", "1.290"]).decimal_comma is None


def test_max_price_is_a_setting():
    assert read_price("5000", max_price=1000).reason == "absurd_price"
    assert read_price("5000", max_price=10000).value == 5000.0
