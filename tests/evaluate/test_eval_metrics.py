"""Metrics on hand-made cases with values worked out by hand."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

import phivision.evaluate.metrics as metrics_module
from phivision.answer.prompt import ParsedAnswer, parse_answer
from phivision.evaluate.metrics import (
    MISSING_PRICE_MIN_LOG_ERROR,
    ItemScores,
    TrainStats,
    aggregate,
    baseline_metrics,
    best_cells,
    group_metrics,
    macro_f1,
    per_category,
    score,
    summarize,
    symmetric_ape,
)


def compute_metrics(truths, parsed, stats):
    """All metrics for parsed answers against catalog rows, with the train baselines' headline keys."""
    return summarize(score(truths, parsed, stats), baseline=baseline_metrics(truths, stats))


def frame(rows: list[tuple]) -> pd.DataFrame:
    cols = ["title", "category", "full_price", "category1_code", "category2_code"]
    return pd.DataFrame(rows, columns=cols)


TRAIN = frame(
    [
        ("Red Bag", "Bags", 100.0, "WOMEN", "ACC"),
        ("Red Bag", "Bags", 200.0, "WOMEN", "ACC"),
        ("Blue Coat", "Coats", 1000.0, "MEN", "CLOTH"),
    ]
)
TEST = frame(
    [
        ("Red Bag", "Bags", 100.0, "WOMEN", "ACC"),
        ("Blue Coat", "Coats", 1000.0, "MEN", "CLOTH"),
        ("Green Scarf", "Scarves", 400.0, "WOMEN", "ACC"),
    ]
)
ANSWERS = [
    "Product: red  bag, Category: bags, Full Price: $110",
    "Product: Blue Coat, Category: Bags, Full Price: 500",
    "I don't know",
]


def test_train_stats() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    assert stats.median_price == 200.0
    assert stats.majority_category == "Bags"
    assert stats.most_common_title == "Red Bag"
    assert stats.levels == ("category1_code", "category2_code")
    assert stats.parents == {
        "bags": {"category1_code": "WOMEN", "category2_code": "ACC"},
        "coats": {"category1_code": "MEN", "category2_code": "CLOTH"},
    }


def test_train_stats_ties_are_order_independent() -> None:
    rows = [("B", "Shoes", 1.0, "X", "Y"), ("A", "Bags", 3.0, "X", "Y")]
    assert TrainStats.from_catalog(frame(rows)).majority_category == "Bags"
    assert TrainStats.from_catalog(frame(rows[::-1])).majority_category == "Bags"
    assert TrainStats.from_catalog(frame(rows)).most_common_title == "A"
    assert TrainStats.from_catalog(frame(rows)).median_price == 2.0


def test_metrics_by_hand() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    m = compute_metrics(TEST, [parse_answer(a) for a in ANSWERS], stats)
    assert m["n"] == 3
    assert m["parse_rate"] == pytest.approx(2 / 3)
    # the unparseable third answer: the floor (APE 1.0, abs error 400) is worse than the median's (0.5, 200)
    assert m["price_mae"] == pytest.approx((10 + 500 + 400) / 3)
    assert m["price_mape"] == pytest.approx((0.1 + 0.5 + 1.0) / 3)
    assert m["price_median_ape"] == pytest.approx(0.5)
    assert m["price_within_10pct"] == pytest.approx(1 / 3)
    # missing price: max(|ln(400 / 200)|, ln 10) = ln 10
    expected_log = math.sqrt((math.log(1.1) ** 2 + math.log(2) ** 2 + math.log(10) ** 2) / 3)
    assert m["price_log_rmse"] == pytest.approx(expected_log)
    assert m["category_accuracy"] == pytest.approx(1 / 3)
    # bags: tp 1, fp 1 -> F1 2/3; coats and scarves: 0
    assert m["category_macro_f1"] == pytest.approx(2 / 9)
    assert m["title_exact"] == pytest.approx(2 / 3)
    assert m["title_similarity"] == pytest.approx(2 / 3)
    # "Bags" maps to WOMEN/ACC: right for item 1, wrong for the coat; nothing for the unparsed scarf
    assert m["category1_accuracy"] == pytest.approx(1 / 3)
    assert m["category2_accuracy"] == pytest.approx(1 / 3)
    assert m["per_category"] == {
        "Bags": {
            "n": 1,
            "accuracy": 1.0,
            "price_mape": pytest.approx(0.1),
            "price_smape": pytest.approx(10 / 105),
        },
        "Coats": {
            "n": 1,
            "accuracy": 0.0,
            "price_mape": pytest.approx(0.5),
            "price_smape": pytest.approx(2 / 3),
        },
        "Scarves": {"n": 1, "accuracy": 0.0, "price_mape": 1.0, "price_smape": 2.0},
    }
    # baseline: Red Bag / Bags / 200 for all -> APEs 1.0, 0.8, 0.5
    assert m["baseline_price_mape"] == pytest.approx(2.3 / 3)
    assert m["baseline_category_accuracy"] == pytest.approx(1 / 3)


def test_unparseable_answers_are_failures_never_dropped() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    m = compute_metrics(TEST, [parse_answer("garbage")] * 3, stats)
    assert m["n"] == 3
    assert m["parse_rate"] == 0.0
    assert m["price_mape"] == 1.0
    assert m["price_median_ape"] == 1.0
    assert m["price_mae"] == pytest.approx(1500 / 3)
    assert m["price_within_10pct"] == 0.0
    assert m["category_accuracy"] == 0.0
    assert m["category_macro_f1"] == 0.0
    assert m["title_exact"] == 0.0
    assert m["title_similarity"] == 0.0
    assert m["category1_accuracy"] == 0.0
    # log penalty: ln(1/2) and ln 5 are under ln 10, so all three get ln 10
    assert m["price_log_rmse"] == pytest.approx(MISSING_PRICE_MIN_LOG_ERROR)


def test_missing_price_is_never_better_than_the_median() -> None:
    stats = TrainStats.from_catalog(TRAIN)  # median 200
    truths = frame([("X", "Bags", 200_000.0, "WOMEN", "ACC"), ("Y", "Bags", 32.0, "WOMEN", "ACC")])
    far, cheap = (r["errors"] for r in score(truths, [ParsedAnswer("X", "Bags", None)] * 2, stats))
    # far above the median: the floor (predicting 0) is worse for APE and abs error, the median for log error
    assert far["price_ape"] == 1.0 and far["price_abs_error"] == 200_000.0
    assert far["price_log_error"] == pytest.approx(math.log(1000))
    # far below the median: the median is worse for APE and abs error, the ln 10 floor for log error
    assert cheap["price_ape"] == pytest.approx(168 / 32) and cheap["price_abs_error"] == 168.0
    assert cheap["price_log_error"] == pytest.approx(math.log(10))
    assert far["complete"] is False and far["price_within_10pct"] is False
    baseline = baseline_metrics(truths, stats)
    missing = summarize(score(truths, [ParsedAnswer("X", "Bags", None)] * 2, stats))
    for key in ("price_mape", "price_median_ape", "price_mae", "price_log_rmse"):
        assert missing[key] >= baseline[key]


def test_partial_answers() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    (record,) = score(TEST.iloc[:1], [parse_answer("Category: Bags")], stats)
    errors = record["errors"]
    assert errors["category_correct"] is True
    assert errors["levels"] == {"category1_code": True, "category2_code": True}
    assert errors["price_ape"] == 1.0 and errors["title_similarity"] == 0.0 and errors["complete"] is False
    assert record["parsed"] == {"title": None, "category": "Bags", "price": None}
    assert record["truth"] == {
        "title": "Red Bag",
        "category": "Bags",
        "price": 100.0,
        "category1_code": "WOMEN",
        "category2_code": "ACC",
    }


def test_title_similarity_is_token_sort_ratio() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    truths = frame(
        [("Red Leather Bag", "Bags", 100.0, "WOMEN", "ACC"), ("red bag", "Bags", 100.0, "WOMEN", "ACC")]
    )
    records = score(
        truths, [ParsedAnswer("bag, RED leather", None, None), ParsedAnswer("Red Bat", None, None)], stats
    )
    assert records[0]["errors"]["title_similarity"] == 1.0
    assert records[0]["errors"]["title_exact"] is False
    # "bag red" vs "bat red": indel distance 2 over 14 characters
    assert records[1]["errors"]["title_similarity"] == pytest.approx(12 / 14)


def test_within_10pct_boundary() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    truths = frame([("A", "Bags", 1000.0, "W", "A")] * 3)
    answers = [ParsedAnswer(None, None, p) for p in (1100.0, 900.0, 1100.01)]
    assert [r["errors"]["price_within_10pct"] for r in score(truths, answers, stats)] == [True, True, False]


def test_macro_f1_counts_hallucinated_classes() -> None:
    # a: tp 1 fn 1 -> 2/3; b: 1; c (only predicted): 0
    assert macro_f1(["a", "a", "b"], ["a", "c", "b"]) == pytest.approx(5 / 9)
    # a missing prediction costs recall but adds no class
    assert macro_f1(["a", "b"], ["a", None]) == pytest.approx((1 + 0) / 2)
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0


def test_levels_skip_items_without_a_true_level() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    truths = frame([("A", "Bags", 100.0, None, "ACC"), ("B", "Coats", 100.0, "WOMEN", "CLOTH")])
    m = summarize(score(truths, [ParsedAnswer("A", "Bags", 100.0), ParsedAnswer("B", "Coats", 100.0)], stats))
    assert m["category1_accuracy"] == 0.0  # only the coat has a level-1 truth, and MEN != WOMEN
    assert m["category2_accuracy"] == 1.0


def test_unknown_predicted_category_is_wrong_at_every_level() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    (record,) = score(TEST.iloc[:1], [ParsedAnswer("Red Bag", "Hats", 100.0)], stats)
    assert record["errors"]["levels"] == {"category1_code": False, "category2_code": False}


def test_baseline_metrics_use_the_same_keys() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    base = baseline_metrics(TEST, stats)
    model = compute_metrics(TEST, [parse_answer(a) for a in ANSWERS], stats)
    assert set(base) | {"baseline_price_mape", "baseline_category_accuracy"} == set(model)
    assert base["parse_rate"] == 1.0
    assert base["price_mape"] == pytest.approx(2.3 / 3)
    assert base["title_exact"] == pytest.approx(1 / 3)
    assert base["category1_accuracy"] == pytest.approx(2 / 3)  # WOMEN for all; the coat is MEN


def test_bad_inputs() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    with pytest.raises(ValueError, match="2 answers"):
        score(TEST, [ParsedAnswer(None, None, None)] * 2, stats)
    with pytest.raises(ValueError, match="positive"):
        score(frame([("A", "Bags", 0.0, "W", "A")]), [ParsedAnswer(None, None, None)], stats)
    with pytest.raises(ValueError, match="no predictions"):
        summarize([])
    with pytest.raises(ValueError, match="train split is empty"):
        TrainStats.from_catalog(TRAIN.iloc[:0])


# ------------------------------------------------------------------------------------------ SMAPE


def test_smape_by_hand() -> None:
    stats = TrainStats.from_catalog(TRAIN)
    m = compute_metrics(TEST, [parse_answer(a) for a in ANSWERS], stats)
    # 110 for 100: 10 / 105; 500 for 1000: 500 / 750; no price: the maximum, 2
    assert m["price_smape"] == pytest.approx((10 / 105 + 500 / 750 + 2.0) / 3)
    assert m["per_category"]["Coats"]["price_smape"] == pytest.approx(500 / 750)
    # baseline: 200 for 100, 1000, 400 -> 100/150, 800/600, 200/300
    assert baseline_metrics(TEST, stats)["price_smape"] == pytest.approx(
        (100 / 150 + 800 / 600 + 200 / 300) / 3
    )


def test_smape_is_symmetric_and_bounded() -> None:
    assert symmetric_ape(100.0, 200.0) == pytest.approx(2 / 3)
    assert symmetric_ape(100.0, 50.0) == pytest.approx(2 / 3)  # half and double cost the same
    assert symmetric_ape(100.0, 1e12) < 2.0
    assert symmetric_ape(100.0, None) == 2.0
    stats = TrainStats.from_catalog(TRAIN)
    (record,) = score(TEST.iloc[:1], [ParsedAnswer("Red Bag", "Bags", None)], stats)
    assert record["errors"]["price_sape"] == 2.0  # a missing price is never better than any answer


# ---------------------------------------------------------------------------------- the best-cell rule


@pytest.mark.parametrize(
    ("values", "key", "kind", "expected"),
    [
        ([0.2, 0.5, 0.3], "category_accuracy", "pct", [False, True, False]),
        ([0.2, 0.5, 0.3], "price_mape", "pct", [True, False, False]),  # lower is better
        ([0.0, 0.0, 0.0], "title_exact", "pct", [False, False, False]),  # all failed: no winner
        ([0.0, 0.0], "price_mape", "pct", [False, False]),  # all tied, even at a perfect score
        ([1.0, 1.0, 0.5], "parse_rate", "pct", [True, True, False]),  # ties share the best
        ([0.12341, 0.12344, 0.2], "price_mape", "pct", [True, True, False]),  # equal as shown: 12.3%
        ([None, 0.5, float("nan")], "category_accuracy", "pct", [False, False, False]),  # one known value
        ([None, 0.5, 0.7], "category_accuracy", "pct", [False, False, True]),  # missing is never best
        ([60, 60, 60], "n", "int", [False, False, False]),  # counts are not ranked
        ([0.9, 0.8], "val_loss", "num", [False, True]),  # training's loss: lower is better
        ([0.7721, 0.7724, 0.5], "title_similarity", "num", [True, True, False]),  # both read 0.772
    ],
)
def test_best_cells(values, key, kind, expected) -> None:
    assert best_cells(values, key, kind) == expected


# ------------------------------------------------------------------------------ weighted aggregation


def _random_records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    stats = TrainStats.from_catalog(TRAIN)
    categories = ["Bags", "Coats", "Scarves", "Shirts"]
    rows = [
        (
            f"T{i}",
            categories[rng.integers(4)],
            float(rng.uniform(10, 1000)),
            "W" if rng.random() < 0.5 else None,
            "A",
        )
        for i in range(n)
    ]
    answers = []
    for title, category, price, _, _ in rows:
        guess = categories[rng.integers(4)] if rng.random() < 0.3 else category
        answers.append(
            ParsedAnswer(
                title if rng.random() < 0.7 else "Other",
                None if rng.random() < 0.1 else guess,
                None if rng.random() < 0.15 else price * float(rng.uniform(0.5, 1.8)),
            )
        )
    return score(frame(rows), answers, stats)


def test_weighted_aggregate_equals_repeating_items() -> None:
    """Weights are repeat counts: aggregate(w) must equal summarize() of the records repeated w times."""
    records = _random_records(40, seed=1)
    items = ItemScores.from_records(records)
    rng = np.random.default_rng(2)
    weights = rng.integers(0, 4, size=(5, len(records)))
    got = aggregate(items, weights)
    for row, w in enumerate(weights):
        expected = summarize([r for r, k in zip(records, w, strict=True) for _ in range(k)])
        for key, value in expected.items():
            if key != "per_category":
                assert got[key][row] == pytest.approx(value), key


def test_median_and_macro_f1_match_the_plain_definitions() -> None:
    for n in (1, 2, 7, 30):
        records = _random_records(n, seed=n)
        m = summarize(records)
        assert m["price_median_ape"] == pytest.approx(
            statistics.median(r["errors"]["price_ape"] for r in records)
        )
        true = [r["truth"]["category"].casefold() for r in records]
        pred = [
            None if r["parsed"]["category"] is None else r["parsed"]["category"].casefold() for r in records
        ]
        f1s = []
        for c in sorted(set(true) | {p for p in pred if p}):
            tp = sum(t == c == p for t, p in zip(true, pred, strict=True))
            fp = sum(p == c != t for t, p in zip(true, pred, strict=True))
            fn = sum(t == c != p for t, p in zip(true, pred, strict=True))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        assert m["category_macro_f1"] == pytest.approx(sum(f1s) / len(f1s))


def test_group_metrics_in_small_chunks(monkeypatch) -> None:
    records = _random_records(30, seed=5)
    whole = per_category(records)
    monkeypatch.setattr(metrics_module, "MAX_WEIGHT_CELLS", 31)  # one group per chunk
    chunked = per_category(records)
    assert list(chunked) == list(whole)
    for category, row in whole.items():
        assert chunked[category] == pytest.approx(row)  # the same up to float rounding of the matrix products
    groups = np.array([0] * 10 + [-1] * 20)
    one = group_metrics(ItemScores.from_records(records), groups, 2)
    assert one["n"].tolist() == [10.0, 0.0]
    assert np.isnan(one["price_mape"][1]) and np.isnan(one["price_median_ape"][1])  # an empty group
    assert one["price_mape"][0] == pytest.approx(summarize(records[:10])["price_mape"])
