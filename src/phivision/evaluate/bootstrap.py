"""Bootstrap confidence intervals for the corpus metrics, so that two evaluations can be compared honestly.

The items are resampled with replacement ``resamples`` times; each resample is a row of counts (how often each
item was drawn) handed to :func:`phivision.evaluate.metrics.aggregate`, the same code that computes the metrics
themselves. The interval is the percentile interval of the replicates. One seed gives one set of resamples, so a
report is reproducible, and two stages scored on the same items share their resamples: the interval of their
difference is then paired, far narrower than two separate intervals suggest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from phivision.args import ReportArgs
from phivision.evaluate.metrics import MAX_WEIGHT_CELLS, ItemScores, aggregate

RESAMPLES, SEED = ReportArgs.resamples, ReportArgs.seed  # `phivision report`'s defaults, declared once there
CONFIDENCE = 0.95


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (rows, n) counts, ``resamples`` rows in all: row r says how often each item is in resample r."""
    rng = np.random.default_rng(seed)
    per_block = max(1, MAX_WEIGHT_CELLS // max(1, n))
    for start in range(0, resamples, per_block):
        rows = min(per_block, resamples - start)
        picks = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
        yield np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def replicates(
    stages: Sequence[ItemScores], resamples: int = RESAMPLES, seed: int = SEED
) -> list[dict[str, np.ndarray]]:
    """Bootstrap replicates of every metric for each stage, all drawn from the same resamples of the items.

    The stages must hold the same number of items, in the same order when they are to be paired.
    """
    n = stages[0].n
    if any(stage.n != n for stage in stages):
        raise ValueError("every stage must hold the same items to share resamples")
    blocks: list[list[dict[str, np.ndarray]]] = [[] for _ in stages]
    for counts in resample_counts(n, resamples, seed):
        for stage, found in zip(stages, blocks, strict=True):
            found.append(aggregate(stage, counts))
    return [{key: np.concatenate([b[key] for b in found]) for key in found[0]} for found in blocks]


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The central ``confidence`` share of the replicates (NaN replicates left out); None when none is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def intervals(
    replicated: Mapping[str, np.ndarray], confidence: float = CONFIDENCE
) -> dict[str, tuple[float, float]]:
    """Percentile intervals for every metric of one stage's replicates."""
    found = {}
    for key, values in replicated.items():
        if key != "n" and (interval := percentile_interval(values, confidence)) is not None:
            found[key] = interval
    return found


def bootstrap_intervals(
    records: Sequence[Mapping], resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE
) -> dict[str, tuple[float, float]]:
    """95% (by default) percentile bootstrap intervals of the metrics of :func:`score` records."""
    (replicated,) = replicates([ItemScores.from_records(records)], resamples, seed)
    return intervals(replicated, confidence)


def paired_difference_intervals(
    before: Sequence[Mapping],
    after: Sequence[Mapping],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, tuple[float, float]]:
    """Intervals of ``after - before`` for every metric, both scored on the same items in the same order."""
    first, second = replicates(
        [ItemScores.from_records(before), ItemScores.from_records(after)], resamples, seed
    )
    return intervals({key: second[key] - first[key] for key in first if key in second}, confidence)
