"""Scores for product answers: price, category and title, with every unreadable answer counted as a miss.

Each item is scored once (:func:`score`); corpus metrics are aggregated from those per-item scores
(:func:`summarize`). ``metrics.json`` and ``predictions.jsonl`` therefore cannot disagree, and the report can
recompute the metrics from a predictions file alone.

Scoring rules (also written into ``metrics.json`` under ``scoring``):

* A missing or unreadable price scores the worse of two trivial predictions: the train median price, and a fixed
  floor (APE 1.0, SAPE 2.0 and absolute error = true price, as if predicting 0; log error ln(10), off by a factor
  of ten). It is never within 10%. So an answer without a price never scores better than the baseline on any
  price metric.
* SAPE, the symmetric absolute percentage error of one price, is ``|pred - true| / ((pred + true) / 2)``, from 0
  to 2 (200%): a price twice too high and one half too low both cost 2/3, where APE charges 1.0 and 0.5.
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

import numpy as np
import pandas as pd
from rapidfuzz import fuzz, utils

from phivision.answer.prompt import ParsedAnswer

MISSING_PRICE_APE = 1.0
MISSING_PRICE_SAPE = 2.0  # the largest SAPE there is (predicting 0)
MISSING_PRICE_MIN_LOG_ERROR = math.log(10)
WITHIN = 0.10
LEVEL_COLUMN = re.compile(r"^category\d+_code$")

# The headline metrics in reading order: (key, label, format); "pct" shows a fraction as a percentage, "price"
# an amount in the catalog's currency.
HEADLINE = (
    ("n", "items", "int"),
    ("parse_rate", "answers fully parsed", "pct"),
    ("price_mape", "price MAPE", "pct"),
    ("price_smape", "price SMAPE", "pct"),
    ("price_median_ape", "price median APE", "pct"),
    ("price_within_10pct", "price within 10%", "pct"),
    ("price_log_rmse", "price log RMSE", "num"),
    ("price_mae", "price MAE", "price"),
    ("category_accuracy", "category accuracy", "pct"),
    ("category_macro_f1", "category macro-F1", "num"),
    ("category1_accuracy", "category level 1 accuracy", "pct"),
    ("category2_accuracy", "category level 2 accuracy", "pct"),
    ("category3_accuracy", "category level 3 accuracy", "pct"),
    ("title_exact", "title exact match", "pct"),
    ("title_similarity", "title similarity", "num"),
)
# What training's evaluations add to these (RUN/metrics.jsonl); ranked and formatted by the same rules.
TRAINING_EVAL = (("val_loss", "validation loss", "num"),)
LOWER_IS_BETTER = frozenset(
    {"price_mape", "price_smape", "price_median_ape", "price_log_rmse", "price_mae", "val_loss"}
)
UNRANKED = frozenset({"n"})

SCORING = {
    "missing_price": "the worse of predicting the train median and a floor: APE max(median APE, 1.0), SAPE 2.0 "
    "(the maximum), abs error max(median abs error, true price), log error max(|ln(true / median)|, ln 10); "
    "never within 10%",
    "price_smape": "mean of |pred - true| / ((pred + true) / 2), from 0 to 200%",
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
    """``int`` with separators, ``pct`` as a percentage, ``price`` with cents, ``num`` with three decimals;
    None as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "pct":
        return f"{100 * float(value):.1f}%"
    if kind == "price":
        return f"{float(value):,.2f}"
    return f"{float(value):,.3f}"


def higher_is_better(key: str) -> bool | None:
    """Which way a metric improves: True, False (errors), or None for counts that are not ranked."""
    if key in UNRANKED:
        return None
    return key not in LOWER_IS_BETTER


def best_cells(values: Sequence[float | None], key: str, kind: str) -> list[bool]:
    """Which of several values of one metric to highlight as best: the one rule every report table uses.

    Values are compared as they are shown (rounded by :func:`format_value`), so two cells that read the same
    tie. Missing values (None, NaN) are never best. Nothing is highlighted when fewer than two values are
    known, when the metric is not ranked, or when all known values tie (a row of 0.0% failures has no winner);
    otherwise every value tied for the best is.
    """
    better = higher_is_better(key)
    shown = [_shown_number(v, kind) for v in values]
    known = [v for v in shown if v is not None]
    if better is None or len(known) < 2 or len(set(known)) == 1:
        return [False] * len(values)
    best = max(known) if better else min(known)
    return [v is not None and v == best for v in shown]


def _shown_number(value: float | None, kind: str) -> float | None:
    """The number a reader sees in a cell, or None when the cell is empty."""
    if value is None or not math.isfinite(float(value)):
        return None
    text = format_value(value, kind).rstrip("%").replace(",", "")
    return float(text)


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
            "price_sape": max(errors["price_sape"], MISSING_PRICE_SAPE),
            "price_log_error": max(errors["price_log_error"], MISSING_PRICE_MIN_LOG_ERROR),
        }
    error = abs(pred - true)
    return {
        "price_abs_error": error,
        "price_ape": error / true,
        "price_sape": symmetric_ape(true, pred),
        "price_log_error": abs(math.log(pred / true)),
    }


def symmetric_ape(true: float, pred: float | None) -> float:
    """SAPE of one price: ``|pred - true| / ((pred + true) / 2)``, 0 to 2; a missing price scores the maximum."""
    if pred is None:
        return MISSING_PRICE_SAPE
    return abs(pred - true) / ((abs(pred) + abs(true)) / 2)


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

# metric -> the per-item score it is the mean of
MEAN_OF = {
    "parse_rate": "complete",
    "price_mae": "price_abs_error",
    "price_mape": "price_ape",
    "price_smape": "price_sape",
    "price_within_10pct": "price_within_10pct",
    "category_accuracy": "category_correct",
    "title_exact": "title_exact",
    "title_similarity": "title_similarity",
}
ITEM_SCORES = (*MEAN_OF.values(), "price_log_error")
# Every corpus metric :func:`aggregate` computes besides ``n`` (which way each improves: LOWER_IS_BETTER);
# a level accuracy ``category<k>_accuracy`` comes on top for each ``category<k>_code`` column of the catalog.
CORPUS_METRICS = (*MEAN_OF, "price_median_ape", "price_log_rmse", "category_macro_f1")
MAX_WEIGHT_CELLS = 2_000_000  # weights handed to aggregate() at once (16 MB of float64)


@dataclass(frozen=True)
class ItemScores:
    """The per-item scores of :func:`score` records as arrays: every corpus metric is computed from these."""

    values: dict[str, np.ndarray]  # score name -> (n,) float
    true_class: np.ndarray  # (n,) int: index of the normalized true category
    pred_class: np.ndarray  # (n,) int: index of the normalized predicted category, -1 when none
    n_classes: int
    levels: dict[str, tuple[np.ndarray, np.ndarray]]  # level column -> (known, correct), each (n,) float

    @property
    def n(self) -> int:
        return len(self.true_class)

    @classmethod
    def from_records(cls, records: Sequence[Mapping]) -> ItemScores:
        errors = [r["errors"] for r in records]
        values = {k: np.array([float(e[k]) for e in errors], dtype=np.float64) for k in ITEM_SCORES}
        true_class, pred_class, n_classes = _encode_classes(
            [normalize_label(r["truth"]["category"]) for r in records],
            [
                None if r["parsed"]["category"] is None else normalize_label(r["parsed"]["category"])
                for r in records
            ],
        )
        levels = {}
        for col in sorted({c for e in errors for c in e.get("levels") or {}}, key=lambda c: (len(c), c)):
            outcome = [(e.get("levels") or {}).get(col) for e in errors]
            known = np.array([o is not None for o in outcome], dtype=np.float64)
            levels[col] = (known, np.array([o is True for o in outcome], dtype=np.float64))
        return cls(values, true_class, pred_class, n_classes, levels)


def _encode_classes(true: Sequence[str], pred: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, int]:
    """Class indices for true and predicted labels over their union (sorted); a missing prediction is -1."""
    classes = {c: i for i, c in enumerate(sorted(set(true) | {p for p in pred if p is not None}))}
    true_class = np.array([classes[t] for t in true], dtype=np.int64)
    pred_class = np.array([-1 if p is None else classes[p] for p in pred], dtype=np.int64)
    return true_class, pred_class, len(classes)


def aggregate(items: ItemScores, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Corpus metrics for each row of ``weights`` (rows, n): how many times each item counts in that row.

    A row of ones gives the plain metrics; bootstrap resample counts give a bootstrap replicate; a 0/1 mask gives
    the metrics of a subgroup. Weights must be non-negative integers. Each metric is a (rows,) array; NaN where a
    row has nothing to measure (no items, or no item with a true level for a level accuracy).
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1, items.n)
    total = w.sum(axis=1)
    out: dict[str, np.ndarray] = {"n": total}
    with np.errstate(invalid="ignore", divide="ignore"):
        for key, column in MEAN_OF.items():
            out[key] = w @ items.values[column] / total
        out["price_median_ape"] = _weighted_median(items.values["price_ape"], w)
        out["price_log_rmse"] = np.sqrt(w @ items.values["price_log_error"] ** 2 / total)
        out["category_macro_f1"] = _weighted_macro_f1(items.true_class, items.pred_class, items.n_classes, w)
        for col, (known, correct) in items.levels.items():
            out[f"{col.removesuffix('_code')}_accuracy"] = (w @ (known * correct)) / (w @ known)
    return out


def generation_metric_names(level_columns: Sequence[str] = ()) -> list[str]:
    """The metrics a scored set of answers reports (:func:`summarize`, less ``n``) for a catalog with these
    ``category<k>_code`` columns: what training's ``eval.metric`` may name besides ``val_loss``."""
    return sorted([*CORPUS_METRICS, *(f"{col.removesuffix('_code')}_accuracy" for col in level_columns)])


def scalar_metrics(summary: Mapping[str, object]) -> dict[str, float]:
    """The numbers a training evaluation reports from :func:`summarize` (not ``n``, not the breakdowns)."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and k != "n"}


def _weighted_median(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Median of ``values`` with item ``i`` repeated ``w[r, i]`` times, per row (the mean of the two middle
    values for an even count, as :func:`statistics.median`)."""
    order = np.argsort(values, kind="stable")
    ordered = np.append(values[order], np.nan)  # index n (past the end) only for empty rows
    cumulative = np.cumsum(w[:, order], axis=1)
    total = cumulative[:, -1:] if len(order) else np.zeros((len(w), 1))
    low = (cumulative <= np.floor((total - 1) / 2)).sum(axis=1)  # first position holding order statistic k
    high = (cumulative <= np.floor(total / 2)).sum(axis=1)
    median = (ordered[low] + ordered[high]) / 2
    return np.where(total[:, 0] > 0, median, np.nan)


def _class_sums(w: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """(rows, n_classes): the weight of the items of each class (items with class -1 count nowhere)."""
    sums = np.zeros((len(w), n_classes))
    keep = np.flatnonzero(classes >= 0)
    if keep.size:
        order = keep[np.argsort(classes[keep], kind="stable")]
        present, starts = np.unique(classes[order], return_index=True)
        sums[:, present] = np.add.reduceat(w[:, order], starts, axis=1)
    return sums


def _weighted_macro_f1(
    true_class: np.ndarray, pred_class: np.ndarray, n_classes: int, w: np.ndarray
) -> np.ndarray:
    """Macro-F1 over the classes that are true or predicted in each row; a missing prediction only costs recall."""
    hits = np.where(true_class == pred_class, true_class, -1)
    tp = _class_sums(w, hits, n_classes)
    true = _class_sums(w, true_class, n_classes)
    pred = _class_sums(w, pred_class, n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (true + pred), 0.0)  # 2tp / (2tp + fp + fn)
        present = (true + pred) > 0
        return (f1 * present).sum(axis=1) / present.sum(axis=1)


def macro_f1(true: Sequence[str], pred: Sequence[str | None]) -> float:
    """Macro-averaged F1 over every class that is true or predicted; None predictions only cost recall."""
    if len(true) != len(pred):
        raise ValueError(f"{len(true)} true labels but {len(pred)} predictions")
    true_class, pred_class, n_classes = _encode_classes(true, pred)
    return float(_weighted_macro_f1(true_class, pred_class, n_classes, np.ones((1, len(true))))[0])


def summarize(records: Sequence[Mapping], baseline: Mapping | None = None) -> dict:
    """Corpus metrics from :func:`score` records (flat keys, plus ``per_category``).

    With ``baseline`` (the :func:`baseline_metrics` dict) adds ``baseline_price_mape`` and
    ``baseline_category_accuracy``.
    """
    if not records:
        raise ValueError("no predictions to score")
    items = ItemScores.from_records(records)
    metrics: dict = {"n": len(records)}
    for key, value in aggregate(items, np.ones((1, items.n))).items():
        if key != "n" and not math.isnan(value[0]):
            metrics[key] = float(value[0])
    if baseline is not None:
        metrics["baseline_price_mape"] = baseline["price_mape"]
        metrics["baseline_category_accuracy"] = baseline["category_accuracy"]
    metrics["per_category"] = per_category(records)
    return metrics


def group_metrics(items: ItemScores, groups: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """:func:`aggregate` for each group of items (``groups[i]`` in ``0..n_groups-1``, -1 for none): (n_groups,)
    arrays, computed a few groups at a time so the masks stay small."""
    per_chunk = max(1, MAX_WEIGHT_CELLS // max(1, items.n))
    parts = []
    for start in range(0, n_groups, per_chunk):
        ids = np.arange(start, min(n_groups, start + per_chunk))
        parts.append(aggregate(items, (groups[None, :] == ids[:, None]).astype(np.float64)))
    if not parts:
        return {}
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def per_category(records: Sequence[Mapping]) -> dict[str, dict]:
    """n, category accuracy, price MAPE and SMAPE for each true category, largest first."""
    names = [r["truth"]["category"] for r in records]
    counts = Counter(names)
    ordered = sorted(counts, key=lambda c: (-counts[c], c))
    index = {category: i for i, category in enumerate(ordered)}
    groups = np.array([index[name] for name in names], dtype=np.int64)
    rows = group_metrics(ItemScores.from_records(records), groups, len(ordered))
    return {
        category: {
            "n": counts[category],
            "accuracy": float(rows["category_accuracy"][i]),
            "price_mape": float(rows["price_mape"][i]),
            "price_smape": float(rows["price_smape"][i]),
        }
        for i, category in enumerate(ordered)
    }


def baseline_metrics(truths: pd.DataFrame, stats: TrainStats) -> dict:
    """The metric dict of the trivial predictor (:meth:`TrainStats.baseline_answer`) on the same items."""
    return summarize(score(truths, [stats.baseline_answer()] * len(truths), stats))
