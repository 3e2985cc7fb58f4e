"""The report's figures, rendered for real: no two labels overlap (measured on the drawn text), prices carry the
currency, errors are in percent. Each figure is checked as built, before the thinning safety net of to_data_uri."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from phivision.evaluate.metrics import MISSING_PRICE_APE
from phivision.evaluate.report_plots import (
    confusion_matrix,
    drawn_tick_labels,
    error_histogram,
    eval_curves,
    loss_curve,
    lr_curve,
    overlapping_labels,
    price_scatter,
    short_number,
    tidy_labels,
    to_data_uri,
)


def record(true: float, pred: float | None, category: str = "Bags", guess: str | None = "Bags") -> dict:
    ape = MISSING_PRICE_APE if pred is None else abs(pred - true) / true
    return {
        "truth": {"title": "t", "category": category, "price": true},
        "parsed": {"title": "t", "category": guess, "price": pred},
        "errors": {"price_ape": ape},
    }


def prices(low: float, high: float, n: int = 60, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    true = np.exp(rng.uniform(np.log(low), np.log(high), n))
    return [record(t, t * float(rng.lognormal(0, 0.4))) for t in true]


def no_overlaps(fig: Figure) -> bool:
    """The figure as designed (the corner rule applied, no thinning) shows no two overlapping labels."""
    return tidy_labels(fig, thin=False) == [] and overlapping_labels(fig) == []


def tick_texts(fig: Figure, which: str) -> list[str]:
    FigureCanvasAgg(fig).draw()
    return [t.get_text() for t in drawn_tick_labels(getattr(fig.axes[0], f"{which}axis"))]


PRICE_RANGES = {
    "cents to millions": (0.05, 5e6),
    "four decades": (60, 190_000),
    "three decades": (30, 30_000),
    "two decades": (50, 5000),
    "one decade": (120, 900),
    "a narrow band": (95, 105),
    "a single price": (1290, 1290),
}


@pytest.mark.parametrize("span", list(PRICE_RANGES))
def test_price_scatter_labels_never_overlap(span: str) -> None:
    low, high = PRICE_RANGES[span]
    fig = price_scatter(prices(low, high) if low < high else [record(low, low * 1.05)] * 5, "EUR")
    assert no_overlaps(fig)
    x_ticks = tick_texts(fig, "x")
    assert len(x_ticks) >= 2, x_ticks  # a reader can always tell the scale
    assert fig.axes[0].get_xlabel() == "true price (EUR)"
    assert fig.axes[0].get_ylabel() == "predicted price (EUR)"


def test_price_ticks_are_plain_numbers() -> None:
    fig = price_scatter(prices(0.5, 2e6), "USD")
    for text in tick_texts(fig, "x"):
        assert "$" not in text and "10^" not in text, text  # no math text such as $10^{3}$
    assert [short_number(v) for v in (1, 50, 2500, 3e6, 0.05)] == ["1", "50", "2.5k", "3M", "0.05"]


def test_currency_is_plain_text() -> None:
    fig = price_scatter(prices(10, 1000), "$\\nocommand{$")
    assert no_overlaps(fig)  # drawing it does not try to parse math


def test_price_scatter_without_currency_or_prices() -> None:
    fig = price_scatter([record(100, None)] * 3, None)
    assert fig.axes[0].get_xlabel() == "true price (currency unknown)"
    assert "3 without a price" in fig.axes[0].get_title()
    assert no_overlaps(fig)


def test_error_histogram_is_in_percent() -> None:
    records = prices(10, 1000) + [record(100, 5000), record(100, 2000), record(100, None)]
    fig = error_histogram(records)
    assert no_overlaps(fig)
    ticks = tick_texts(fig, "x")
    assert ticks == ["-100%", "0%", "+100%", "+200%", "+300%"]
    assert "-50% = half" in fig.axes[0].get_xlabel()
    assert "1 without a price" in fig.axes[0].get_title()
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert "2 at +300% or more" in notes  # the tail is counted, not cut off


@pytest.mark.parametrize("n_categories", [2, 15, 40])
def test_confusion_matrix_labels_never_overlap(n_categories: int) -> None:
    rng = np.random.default_rng(n_categories)
    names = [f"Very Long Category Name Number {i} With Words" for i in range(n_categories)]
    records = []
    for i in range(300):
        true = names[i % n_categories]
        guess = names[rng.integers(n_categories)] if rng.random() < 0.3 else true
        records.append(record(100, 100, true, None if rng.random() < 0.05 else guess))
    fig = confusion_matrix(records)
    assert no_overlaps(fig)
    labels = tick_texts(fig, "y")
    assert all(len(label) <= 24 for label in labels)
    if n_categories > 15:
        assert "(other)" in labels


def test_training_curves_labels_never_overlap() -> None:
    steps = range(1, 12_001, 10)
    train = [{"step": s, "loss": 3.0 * s**-0.3, "lr": 2e-4 * min(1.0, s / 500)} for s in steps]
    evals = [
        {
            "step": s,
            "val_loss": 2.5 * s**-0.25,
            "parse_rate": 1.0,
            "category_accuracy": s / 12_000,
            "price_within_10pct": 0.3,
            "price_smape": 0.4,
        }
        for s in range(1000, 12_001, 1000)
    ]
    for fig in (
        loss_curve(train, evals, best_step=9000),
        lr_curve(train),
        eval_curves(
            evals, [("parse_rate", "parsed"), ("category_accuracy", "category"), ("price_smape", "SMAPE")]
        ),
    ):
        assert no_overlaps(fig)
    ticks = tick_texts(eval_curves(evals, [("category_accuracy", "category")]), "y")
    assert ticks and all(t.endswith("%") for t in ticks)
    assert any(t.endswith("k") for t in tick_texts(lr_curve(train), "x"))  # 12k steps, not 12000


def test_the_overlap_check_finds_overlaps_and_the_safety_net_removes_them() -> None:
    fig = Figure(figsize=(2, 2))
    ax = fig.add_subplot()
    ax.set_xticks(range(12), [f"label number {i}" for i in range(12)])
    assert overlapping_labels(fig)  # the measurement is real: crowded labels are caught
    uri = to_data_uri(fig)
    assert no_overlaps(fig)
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.format == "PNG" and image.width > 100
