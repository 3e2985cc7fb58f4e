"""Bootstrap intervals: against a plain loop over explicitly resampled records, seeded, paired, chunk-independent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import phivision.evaluate.bootstrap as bootstrap_module
import phivision.evaluate.metrics as metrics_module
from phivision.answer.prompt import ParsedAnswer
from phivision.evaluate.bootstrap import (
    bootstrap_intervals,
    paired_difference_intervals,
    resample_counts,
)
from phivision.evaluate.metrics import TrainStats, score, summarize

CATEGORIES = ["Bags", "Coats", "Scarves", "Shirts", "Hats"]


def scored(n: int, seed: int, skill: float) -> list[dict]:
    """n items answered by a model that is right with probability ``skill``; the truths depend on n only."""
    truth_rng, answer_rng = np.random.default_rng(n), np.random.default_rng(seed)
    rows = [
        (f"T{i}", CATEGORIES[truth_rng.integers(5)], float(truth_rng.lognormal(5, 1.2))) for i in range(n)
    ]
    truths = pd.DataFrame(rows, columns=["title", "category", "full_price"])
    stats = TrainStats.from_catalog(truths)
    answers = []
    for title, category, price in rows:
        right = answer_rng.random() < skill
        answers.append(
            ParsedAnswer(
                title,
                category if right else CATEGORIES[answer_rng.integers(5)],
                price * float(answer_rng.lognormal(0, 0.1 if right else 0.8)),
            )
        )
    return score(truths, answers, stats)


def test_counts_are_resamples_with_replacement() -> None:
    blocks = list(resample_counts(50, 30, seed=0))
    counts = np.concatenate(blocks)
    assert counts.shape == (30, 50)
    assert (counts.sum(axis=1) == 50).all()
    assert (counts == 0).mean() == pytest.approx((1 - 1 / 50) ** 50, abs=0.05)  # ~37% of items left out


def test_intervals_match_a_plain_bootstrap_loop() -> None:
    records = scored(40, seed=1, skill=0.6)
    found = bootstrap_intervals(records, resamples=200, seed=7)
    replicates = []
    for counts in resample_counts(40, 200, seed=7):
        for row in counts:
            replicates.append(
                summarize([r for r, k in zip(records, row, strict=True) for _ in range(int(k))])
            )
    for key in ("price_mape", "price_smape", "price_median_ape", "category_accuracy", "category_macro_f1"):
        low, high = np.percentile([m[key] for m in replicates], [2.5, 97.5])
        assert found[key] == pytest.approx((low, high)), key


def test_intervals_are_seeded_and_cover_the_estimate() -> None:
    records = scored(300, seed=2, skill=0.7)
    first = bootstrap_intervals(records)
    assert bootstrap_intervals(records) == first  # the default seed: the same report twice
    assert bootstrap_intervals(records, seed=1) != first
    point = summarize(records)
    for key, (low, high) in first.items():
        assert low <= point[key] <= high, key
    # more items, narrower intervals: about 1/sqrt(n)
    wide = bootstrap_intervals(scored(75, seed=2, skill=0.7))
    assert (wide["category_accuracy"][1] - wide["category_accuracy"][0]) > 1.5 * (
        first["category_accuracy"][1] - first["category_accuracy"][0]
    )


def test_chunking_does_not_change_the_intervals(monkeypatch) -> None:
    records = scored(64, seed=3, skill=0.5)
    whole = bootstrap_intervals(records, resamples=100)
    monkeypatch.setattr(bootstrap_module, "MAX_WEIGHT_CELLS", 64 * 7)  # blocks of 7 resamples
    monkeypatch.setattr(metrics_module, "MAX_WEIGHT_CELLS", 64 * 7)
    chunked = bootstrap_intervals(records, resamples=100)
    assert chunked.keys() == whole.keys()
    for key, interval in whole.items():
        assert chunked[key] == pytest.approx(interval, rel=1e-12), key  # the same resamples, in other blocks


def test_paired_difference_is_narrower_than_separate_intervals() -> None:
    """Two models on the same items: the paired interval of the change sees what overlapping intervals hide."""
    before, after = scored(200, seed=4, skill=0.55), scored(200, seed=5, skill=0.65)
    separate = bootstrap_intervals(before), bootstrap_intervals(after)
    change = paired_difference_intervals(before, after)
    point = summarize(after)["category_accuracy"] - summarize(before)["category_accuracy"]
    low, high = change["category_accuracy"]
    assert low <= point <= high
    width_sum = sum(iv["category_accuracy"][1] - iv["category_accuracy"][0] for iv in separate)
    assert high - low < width_sum
    # the same model twice: no change at all
    assert paired_difference_intervals(before, before)["price_mape"] == (0.0, 0.0)


def test_stages_of_different_sizes_cannot_be_paired() -> None:
    with pytest.raises(ValueError, match="same items"):
        paired_difference_intervals(scored(10, 0, 0.5), scored(12, 0, 0.5))
