"""Price ranges whose coverage is measured: split-conformal calibration of the model's own price spread.

Every constrained answer comes with its price ``p`` and a spread ``s``: how far, in log-price, the model's own
distribution over the price it writes strays from ``p`` (:mod:`phivision.answer.price_spread`). On held-out items
whose prices are known (the val split) the score ``|ln(y / p)| / (s + floor)`` says how many spreads off each
answer was. The range at level ``a`` is ``p * exp(+-q * (s + floor))``, ``q`` the ``ceil((n + 1) a)``-th
smallest of the ``n`` calibration scores. For an item exchangeable with the calibration items, the chance that
its true price lies inside is at least ``a`` and below ``a + 1 / (n + 1)`` (split conformal prediction with a
locally weighted score: Vovk et al. 2005, Lei et al. 2018). One set of scores serves every level, so the level
can be chosen when answering, and a calibration plot (nominal against observed coverage) needs no refit.

An answer without a price scores infinity: it is never covered, so it widens every range rather than vanishing.
A level the calibration set is too small for (``ceil((n + 1) a) > n``) has an unbounded range, reported as no
range (None) rather than a made-up one. Pure numpy: no torch, no model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phivision.args import PRICE_LEVEL
from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError
from phivision.io import atomic_write_json

PLOT_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the calibration plot's nominal levels
# Added to every spread so that an answer the model is sure of still gets a range a rounding can miss.
DEFAULT_FLOOR = 0.01
# The floors calibration chooses among, as multiples of the calibration items' median spread: the larger the
# floor, the less the model's own spread moves the width (the choice is measured, :func:`choose_floor`).
FLOOR_MULTIPLES = (0.5, 1.0, 2.0, 4.0, 8.0)


def check_level(level: float, name: str = "level") -> float:
    """A coverage level strictly between 0 and 1 (ValueError naming ``name`` otherwise)."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < float(level) < 1:
        raise ValueError(f"{name} {level!r}: must be a number strictly between 0 and 1 (e.g. 0.8)")
    return float(level)


def nonconformity(
    true: Sequence[float] | np.ndarray,
    price: Sequence[float | None] | np.ndarray,
    spread: Sequence[float | None] | np.ndarray,
    floor: float = DEFAULT_FLOOR,
) -> np.ndarray:
    """``|ln(true / price)| / (spread + floor)`` per item; infinity where the price or spread is missing."""
    y = np.asarray(true, dtype=np.float64)
    p = np.array([np.nan if v is None else v for v in price], dtype=np.float64)
    s = np.array([np.nan if v is None else v for v in spread], dtype=np.float64)
    scores = np.full(y.shape, np.inf)
    known = np.isfinite(p) & (p > 0) & np.isfinite(s) & (s >= 0) & np.isfinite(y) & (y > 0)
    scores[known] = np.abs(np.log(y[known] / p[known])) / (s[known] + floor)
    return scores


def conformal_quantile(scores: Sequence[float] | np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) level)``-th smallest score: the split-conformal quantile (infinity when n is too small)."""
    level = check_level(level)
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * level - 1e-9)
    return float(ordered[rank - 1]) if rank <= len(ordered) else math.inf


@dataclass(frozen=True)
class PriceRange:
    """One answer's price range at ``level`` (None, None: no range), and its ranges at the calibration plot's
    levels, as ``(level, low, high)``, so an evaluation can draw observed against nominal coverage."""

    low: float | None
    high: float | None
    level: float
    by_level: tuple[tuple[float, float | None, float | None], ...] = ()


@dataclass(frozen=True)
class PriceCalibration:
    """The calibration scores of one model and the rule that turns an answer's price and spread into a range."""

    scores: tuple[float, ...]  # sorted nonconformity scores of the calibration items (inf: no price)
    floor: float = DEFAULT_FLOOR
    method: str = "digits"  # where the spread comes from (phivision.answer.price_spread)
    source: str = ""  # the items it was computed on, e.g. "val split of data/sample (62 items)"

    def __post_init__(self) -> None:
        scores = tuple(sorted(float(s) for s in self.scores))
        if not scores or any(math.isnan(s) or s < 0 for s in scores):
            raise ValueError("calibration scores must be a non-empty list of numbers >= 0")
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"floor must be a positive number, got {self.floor!r}")
        object.__setattr__(self, "scores", scores)

    @property
    def n(self) -> int:
        return len(self.scores)

    def quantile(self, level: float) -> float:
        return conformal_quantile(self.scores, level)

    def interval(
        self, price: float | None, spread: float | None, level: float = PRICE_LEVEL
    ) -> tuple[float | None, float | None]:
        """``(price_low, price_high)`` at ``level``; (None, None) without a price or spread, or when unbounded."""
        low, high = self.intervals([price], [spread], level)
        return (None, None) if math.isnan(low[0]) else (float(low[0]), float(high[0]))

    def price_range(
        self, price: float | None, spread: float | None, level: float = PRICE_LEVEL, plot: bool = False
    ) -> PriceRange:
        """The :class:`PriceRange` of one answer; with ``plot``, also at every level of :data:`PLOT_LEVELS`."""
        low, high = self.interval(price, spread, level)
        by_level = tuple((lv, *self.interval(price, spread, lv)) for lv in PLOT_LEVELS) if plot else ()
        return PriceRange(low, high, level, by_level)

    def intervals(
        self,
        prices: Sequence[float | None] | np.ndarray,
        spreads: Sequence[float | None] | np.ndarray,
        level: float = PRICE_LEVEL,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Arrays of lows and highs at ``level``, rounded outwards to cents; NaN where an item has no range."""
        p = np.array([np.nan if v is None else v for v in prices], dtype=np.float64)
        s = np.array([np.nan if v is None else v for v in spreads], dtype=np.float64)
        half = self.quantile(level) * (s + self.floor)  # NaN for a missing spread, inf when unbounded
        ok = np.isfinite(p) & (p > 0) & np.isfinite(half)
        half = np.where(ok, half, 0.0)
        low = np.where(ok, np.floor(p * np.exp(-half) * 100 + 1e-6) / 100, np.nan)
        high = np.where(ok, np.ceil(p * np.exp(half) * 100 - 1e-6) / 100, np.nan)
        return low, high

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "floor": self.floor,
            "source": self.source,
            "n": self.n,
            "scores": [s if math.isfinite(s) else None for s in self.scores],  # JSON has no infinity
        }

    @classmethod
    def from_dict(cls, data: Any) -> PriceCalibration:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"method", "floor", "source", "n", "scores"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        scores = data.get("scores")
        if not isinstance(scores, list) or not all(
            s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in scores
        ):
            raise ValueError("'scores' must be a list of numbers (null for an answer without a price)")
        floor = data.get("floor", DEFAULT_FLOOR)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)):
            raise ValueError(f"'floor' must be a number, got {floor!r}")
        return cls(
            tuple(math.inf if s is None else float(s) for s in scores),
            float(floor),
            str(data.get("method", "digits")),
            str(data.get("source", "")),
        )


def calibrate(
    true: Sequence[float] | np.ndarray,
    prices: Sequence[float | None] | np.ndarray,
    spreads: Sequence[float | None] | np.ndarray,
    floor: float | None = None,
    method: str = "digits",
    source: str = "",
) -> PriceCalibration:
    """The calibration of answers (``prices`` with their ``spreads``) to items whose ``true`` prices are known.

    ``floor`` None: chosen on the items by :func:`choose_floor`.
    """
    if len(true) == 0:
        raise ValueError("calibration needs at least one item with a known price")
    if not len(true) == len(prices) == len(spreads):
        raise ValueError(f"{len(true)} true prices but {len(prices)} answers and {len(spreads)} spreads")
    if floor is None:
        floor = choose_floor(true, prices, spreads)
    scores = nonconformity(true, prices, spreads, floor)
    return PriceCalibration(tuple(scores.tolist()), floor, method, source)


def choose_floor(
    true: Sequence[float] | np.ndarray,
    prices: Sequence[float | None] | np.ndarray,
    spreads: Sequence[float | None] | np.ndarray,
    level: float = PRICE_LEVEL,
) -> float:
    """The floor, among :data:`DEFAULT_FLOOR` and :data:`FLOOR_MULTIPLES` of the median spread, whose ranges at
    ``level`` are narrowest on the calibration items, cross-fitted: each half of the items (alternate items)
    sets the quantile that the other half's widths are measured with.

    Why: how far the model's spread tracks its errors differs from model to model. Where it does, a small floor
    lets the width follow it (narrow for sure answers, wide for guesses); where it does not, a large floor keeps
    the widths close to one relative width, the narrowest ranges that keep the coverage. Coverage holds for any
    floor; the choice among six only trades widths (measured in benchmarks/bench_intervals.py).
    """
    y = np.asarray(true, dtype=np.float64)
    p = np.array([np.nan if v is None else v for v in prices], dtype=np.float64)
    s = np.array([np.nan if v is None else v for v in spreads], dtype=np.float64)
    known = s[np.isfinite(s)]
    typical = float(np.median(known)) if known.size else 0.0
    candidates = [DEFAULT_FLOOR, *(max(DEFAULT_FLOOR, m * typical) for m in FLOOR_MULTIPLES if typical > 0)]
    halves = [np.arange(len(y)) % 2 == k for k in (0, 1)]
    ranged = np.isfinite(p) & (p > 0) & np.isfinite(s)  # items without a price have no width at any floor
    best, best_width = DEFAULT_FLOOR, math.inf
    for floor in candidates:
        widths = []
        for fit, use in ((halves[0], halves[1]), (halves[1], halves[0])):
            scores = nonconformity(y[fit], p[fit], s[fit], floor)
            q = conformal_quantile(scores, level) if fit.any() else math.inf
            use = use & ranged
            half = q * (s[use] + floor)
            with np.errstate(over="ignore", invalid="ignore"):
                widths.append(p[use] * (np.exp(half) - np.exp(-half)) / y[use])  # inf where q is
        width = float(np.mean(np.concatenate(widths))) if ranged.sum() > 1 else math.inf
        if width < best_width:  # ties keep the smaller floor: the width follows the model more
            best, best_width = floor, width
    return best


def coverage(
    true: Sequence[float] | np.ndarray, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per item: whether ``low <= true <= high`` (False without a range) and the width relative to the true
    price, ``(high - low) / true`` (NaN without a range)."""
    y = np.asarray(true, dtype=np.float64)
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    known = np.isfinite(low) & np.isfinite(high)
    covered = known & (low <= y) & (y <= high)
    with np.errstate(invalid="ignore"):
        width = np.where(known, (high - low) / y, np.nan)
    return covered, width


def write_calibration(run_dir: str | os.PathLike, calibration: PriceCalibration) -> Path:
    """Write ``RUN/calibration.json`` atomically."""
    path = RunLayout(run_dir).calibration
    atomic_write_json(path, calibration.to_dict())
    return path


def read_calibration(run_dir: str | os.PathLike) -> PriceCalibration | None:
    """``RUN/calibration.json``, or None for a run without one (trained before ranges, or without a val split)."""
    path = RunLayout(run_dir).calibration
    if not path.is_file():
        return None
    try:
        return PriceCalibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as err:
        raise PhivisionError(f"{path}: {err}") from err
