"""Scores for product answers: price, category and title, with every unreadable answer counted as a miss.

Each item is scored once (:func:`score`); corpus metrics are aggregated from those per-item scores
(:func:`summarize`). ``metrics.json`` and ``predictions.jsonl`` therefore cannot disagree, and the report can
recompute the metrics from a predictions file alone.

Scoring rules (also written into ``metrics.json`` under ``scoring``):

* A missing or unreadable price scores the worse of two trivial predictions: the train median price, and a fixed
  floor (APE 1.0 and absolute error = true price, as if predicting 0; log error ln(10), off by a factor of ten).
  It is never within 10%. So an answer without a price never scores better than the baseline on any price metric.
* A missing category or title is wrong (accuracy 0, title similarity 0) and counts as a false negative for the
  true class in macro-F1.
* Categories and titles are compared after case folding and collapsing whitespace.
* ``title_similarity`` is rapidfuzz's ``fuzz.token_sort_ratio`` (word order ignored, lower-cased, punctuation
  stripped by ``utils.default_process``) divided by 100, so 1.0 means the same words.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
from rapidfuzz import fuzz, utils

from phivision.prompt import ParsedAnswer

MISSING_PRICE_APE = 1.0
MISSING_PRICE_MIN_LOG_ERROR = math.log(10)
WITHIN = 0.10
LEVEL_COLUMN = re.compile(r"^category\d+_code$")

# The headline metrics in reading order: (key, label, format); "pct" shows a fraction as a percentage.
HEADLINE = (
    ("n", "items", "int"),
    ("parse_rate", "answers fully parsed", "pct"),
    ("price_mape", "price MAPE", "pct"),
    ("price_median_ape", "price median APE", "pct"),
    ("price_within_10pct", "price within 10%", "pct"),
    ("price_log_rmse", "price log RMSE", "num"),
    ("price_mae", "price MAE", "num"),
    ("category_accuracy", "category accuracy", "pct"),
    ("category_macro_f1", "category macro-F1", "num"),
    ("category1_accuracy", "category level 1 accuracy", "pct"),
    ("category2_accuracy", "category level 2 accuracy", "pct"),
    ("category3_accuracy", "category level 3 accuracy", "pct"),
    ("title_exact", "title exact match", "pct"),
    ("title_similarity", "title similarity", "num"),
)
LOWER_IS_BETTER = frozenset({"price_mape", "price_median_ape", "price_log_rmse", "price_mae"})

SCORING = {
    "missing_price": "the worse of predicting the train median and a floor: APE max(median APE, 1.0), abs error "
    "max(median abs error, true price), log error max(|ln(true / median)|, ln 10); never within 10%",
    "missing_category_or_title": "wrong; title similarity 0; a false negative for the true class in macro-F1",
    "matching": "categories and titles compared case-folded with whitespace collapsed",
    "title_similarity": "rapidfuzz fuzz.token_sort_ratio(pred, true, processor=utils.default_process) / 100",
    "category_macro_f1": "mean F1 over the true classes and the predicted classes (missing predictions excluded)",
    "category_levels": "the predicted leaf category mapped to its parents by the train split's most common "
    "category<k>_code; unknown predicted categories are wrong at every level",
}


def normalize_label(text: object) -> str:
    """Case-folded, whitespace-collapsed form used to compare categories and titles."""
    return " ".join(str(text).casefold().split())


def format_value(value: object, kind: str) -> str:
    """``int`` with separators, ``pct`` as a percentage, ``num`` with three decimals; None as a dash."""
    if value is None:
        return "—"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "pct":
        return f"{100 * float(value):.1f}%"
    return f"{float(value):,.3f}"


def _present(value: object) -> bool:
    return (
        value is not None
        and not (isinstance(value, float) and math.isnan(value))
        and str(value).strip() != ""
    )


def _mode(values: Sequence[str]) -> str:
    """Most common value; ties go to the alphabetically first so results do not depend on row order."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def level_columns(frame: pd.DataFrame) -> list[str]:
    """The category hierarchy columns present in a catalog (``category1_code``, ``category2_code``, ...)."""
    return sorted((c for c in frame.columns if LEVEL_COLUMN.match(str(c))), key=lambda c: (len(c), c))


@dataclass(frozen=True)
class TrainStats:
    """What the baselines and the missing-price penalty need from the train split."""

    median_price: float
    majority_category: str
    most_common_title: str
    levels: tuple[str, ...] = ()
    parents: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # normalized leaf -> level column -> value

    @classmethod
    def from_catalog(cls, train: pd.DataFrame) -> TrainStats:
        """Compute the statistics from the train rows of a catalog (columns title, category, full_price)."""
        if len(train) == 0:
            raise ValueError("the train split is empty: baselines need train rows")
        levels = tuple(level_columns(train))
        parents: dict[str, dict[str, str]] = {}
        leaves = train["category"].map(normalize_label)
        for leaf, rows in train.groupby(leaves, sort=True):
            parents[leaf] = {}
            for col in levels:
                values = [str(v) for v in rows[col] if _present(v)]
                if values:
                    parents[leaf][col] = _mode(values)
        return cls(
            median_price=float(statistics.median(float(p) for p in train["full_price"])),
            majority_category=_mode([str(c) for c in train["category"]]),
            most_common_title=_mode([str(t) for t in train["title"]]),
            levels=levels,
            parents=parents,
        )

    def baseline_answer(self) -> ParsedAnswer:
        """The trivial predictor: most common train title, majority train category, median train price."""
        return ParsedAnswer(self.most_common_title, self.majority_category, self.median_price)


# ------------------------------------------------------------------------------------------- per item


def _price_errors(true: float, pred: float | None, median: float) -> dict:
    """Absolute, relative and log error; a missing price gets the worse of the median's errors and the floor."""
    if pred is None:
        errors = _price_errors(true, median, median)
        return {
            "price_abs_error": max(errors["price_abs_error"], true),
            "price_ape": max(errors["price_ape"], MISSING_PRICE_APE),
            "price_log_error": max(errors["price_log_error"], MISSING_PRICE_MIN_LOG_ERROR),
        }
    error = abs(pred - true)
    return {
        "price_abs_error": error,
        "price_ape": error / true,
        "price_log_error": abs(math.log(pred / true)),
    }


def score_item(truth: Mapping, parsed: ParsedAnswer, stats: TrainStats) -> dict:
    """Per-item errors for one answer; ``truth`` has title, category, full_price and any category<k>_code."""
    true_price = float(truth["full_price"])
    if not (math.isfinite(true_price) and true_price > 0):
        raise ValueError(f"true price must be positive, got {truth['full_price']!r}")
    errors = _price_errors(true_price, parsed.price, stats.median_price)
    errors["price_within_10pct"] = parsed.price is not None and errors["price_ape"] <= WITHIN + 1e-12
    pred_category = normalize_label(parsed.category) if parsed.category is not None else None
    errors["category_correct"] = pred_category == normalize_label(truth["category"])
    errors["levels"] = {}
    for col in stats.levels:
        if col not in truth or not _present(truth[col]):
            errors["levels"][col] = None  # nothing to compare against
            continue
        pred_level = stats.parents.get(pred_category, {}).get(col) if pred_category is not None else None
        errors["levels"][col] = pred_level is not None and normalize_label(pred_level) == normalize_label(
            truth[col]
        )
    if parsed.title is None:
        errors["title_exact"], errors["title_similarity"] = False, 0.0
    else:
        errors["title_exact"] = normalize_label(parsed.title) == normalize_label(truth["title"])
        similarity = fuzz.token_sort_ratio(parsed.title, str(truth["title"]), processor=utils.default_process)
        errors["title_similarity"] = similarity / 100.0
    errors["complete"] = parsed.complete
    return errors


def score(truths: pd.DataFrame, parsed: Sequence[ParsedAnswer], stats: TrainStats) -> list[dict]:
    """One record per item: ``{"truth": {...}, "parsed": {...}, "errors": {...}}``, in input order."""
    if len(truths) != len(parsed):
        raise ValueError(f"{len(truths)} truths but {len(parsed)} answers")
    records = []
    for truth, answer in zip(truths.to_dict("records"), parsed, strict=True):
        true = {
            "title": str(truth["title"]),
            "category": str(truth["category"]),
            "price": float(truth["full_price"]),
        }
        true.update({col: str(truth[col]) for col in stats.levels if col in truth and _present(truth[col])})
        records.append(
            {"truth": true, "parsed": answer.to_dict(), "errors": score_item(truth, answer, stats)}
        )
    return records


# ------------------------------------------------------------------------------------------ aggregate


def macro_f1(true: Sequence[str], pred: Sequence[str | None]) -> float:
    """Macro-averaged F1 over every class that is true or predicted; None predictions only cost recall."""
    classes = set(true) | {p for p in pred if p is not None}
    f1s = []
    for cls in sorted(classes):
        tp = sum(t == cls and p == cls for t, p in zip(true, pred, strict=True))
        fp = sum(t != cls and p == cls for t, p in zip(true, pred, strict=True))
        fn = sum(t == cls and p != cls for t, p in zip(true, pred, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def summarize(records: Sequence[Mapping], baseline: Mapping | None = None) -> dict:
    """Corpus metrics from :func:`score` records (flat keys, plus ``per_category``).

    With ``baseline`` (the :func:`baseline_metrics` dict) adds ``baseline_price_mape`` and
    ``baseline_category_accuracy``.
    """
    if not records:
        raise ValueError("no predictions to score")
    errors = [r["errors"] for r in records]
    apes = [e["price_ape"] for e in errors]
    metrics: dict = {
        "n": len(records),
        "parse_rate": _mean([e["complete"] for e in errors]),
        "price_mae": _mean([e["price_abs_error"] for e in errors]),
        "price_mape": _mean(apes),
        "price_median_ape": float(statistics.median(apes)),
        "price_within_10pct": _mean([e["price_within_10pct"] for e in errors]),
        "price_log_rmse": math.sqrt(_mean([e["price_log_error"] ** 2 for e in errors])),
        "category_accuracy": _mean([e["category_correct"] for e in errors]),
        "category_macro_f1": macro_f1(
            [normalize_label(r["truth"]["category"]) for r in records],
            [
                None if r["parsed"]["category"] is None else normalize_label(r["parsed"]["category"])
                for r in records
            ],
        ),
        "title_exact": _mean([e["title_exact"] for e in errors]),
        "title_similarity": _mean([e["title_similarity"] for e in errors]),
    }
    for col in sorted({c for e in errors for c in e.get("levels", {})}, key=lambda c: (len(c), c)):
        known = [e["levels"][col] for e in errors if e.get("levels", {}).get(col) is not None]
        if known:
            metrics[f"{col.removesuffix('_code')}_accuracy"] = _mean(known)
    if baseline is not None:
        metrics["baseline_price_mape"] = baseline["price_mape"]
        metrics["baseline_category_accuracy"] = baseline["category_accuracy"]
    metrics["per_category"] = per_category(records)
    return metrics


def per_category(records: Sequence[Mapping]) -> dict[str, dict]:
    """n, category accuracy and price MAPE for each true category, largest first."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["truth"]["category"], []).append(r["errors"])
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {
        cat: {
            "n": len(errs),
            "accuracy": _mean([e["category_correct"] for e in errs]),
            "price_mape": _mean([e["price_ape"] for e in errs]),
        }
        for cat, errs in ordered
    }


def baseline_metrics(truths: pd.DataFrame, stats: TrainStats) -> dict:
    """The metric dict of the trivial predictor (:meth:`TrainStats.baseline_answer`) on the same items."""
    return summarize(score(truths, [stats.baseline_answer()] * len(truths), stats))


def compute_metrics(truths: pd.DataFrame, parsed: Sequence[ParsedAnswer], stats: TrainStats) -> dict:
    """All metrics for parsed answers against catalog rows, with the train baselines' headline keys."""
    return summarize(score(truths, parsed, stats), baseline=baseline_metrics(truths, stats))
