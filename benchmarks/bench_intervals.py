"""Price ranges with measured coverage: which uncertainty to calibrate, side by side in one run.

Needs a fine-tuned run and a dataset with val and test splits (the demo's run, and a larger synthetic catalog
drawn by the same rules, so that coverage is measured on enough items):

    phivision demo --out phivision-demo
    phivision sample --out runs/intervals-data --n 2400 --seed 1 --split 0.2,0.4,0.4
    python benchmarks/bench_intervals.py --run phivision-demo/run --data runs/intervals-data \
        --baseline-data phivision-demo/data --limit 400 --samples 4 --save runs/bench18.json

(``--limit 400 --samples 4``: the run in benchmarks/RESULTS.md, about 22 minutes on 2 busy CPU cores; all 960 +
960 photos with 8 samples take about two hours there.)

Every method is calibrated on the val split (split conformal) and measured on the test split, at 50%, 80% and
95%: the share of test prices inside the range (coverage; it should be the nominal level) and the mean width of
the range relative to the true price (narrower is better at the same coverage). The methods:

* **greedy, fixed width**: the greedy answer's price, and a range of one relative width for every item (plain
  split conformal on ``|ln(true / price)|``): what a range costs when the model's own uncertainty is ignored.
* **digit tokens**: the greedy answer's price, with the spread of the model's own distribution over the price
  it writes (``phivision.answer.price_spread``: first deviations from the greedy path, read from the scores the
  answer was generated with), as ``|ln(true / price)| / (spread + floor)`` (locally weighted conformal).
  Two summaries of that distribution are compared: mean absolute log deviation (the library's) and weighted
  standard deviation of the log price; and its own quantiles widened by the calibration (conformalized
  quantiles, CQR: Romano et al. 2019).
* **K samples**: ``--samples`` answers per photo at temperature 1 under the same constraint; the price is
  their median and the spread their mean absolute log deviation from it (locally weighted conformal), or their
  empirical quantiles widened by the calibration (conformalized quantiles, CQR).
* **category price quantiles**: the central range of the train prices of the answer's category
  (``--baseline-data``'s train split: what the model was trained on), as it is, and conformalized (CQR).

Cost: seconds per photo of each way of answering (greedy; greedy with the digit distribution; K samples),
timed interleaved chunk by chunk on the same images so that they see the same machine load, and the ratio to
greedy. One machine, one process; the model is loaded once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from phivision.answer.calibration import (
    DEFAULT_FLOOR,
    calibrate,
    conformal_quantile,
    coverage,
    nonconformity,
)
from phivision.answer.constrain import AnswerConstraint
from phivision.answer.generate import generate_completions
from phivision.answer.price_spread import PriceDistribution
from phivision.answer.prompt import parse_answer
from phivision.data.images import load_image
from phivision.data.layout import load_catalog
from phivision.runs import load_model

LEVELS = (0.5, 0.8, 0.95)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][min(np.searchsorted(cumulative, q * cumulative[-1]), len(values) - 1)])


SPREADS = ("mean |log|", "std log", "half IQR log")


def digit_spreads(item: dict) -> dict:
    """Summaries of one answer's first-deviation price distribution (log scale, around its price), and the
    distribution's central ranges at each level (for CQR)."""
    if item["values"] is None:
        return {name: math.nan for name in SPREADS} | {level: (math.nan, math.nan) for level in LEVELS}
    price = item["price"]
    values, weights = np.asarray(item["values"]), np.asarray(item["weights"])
    deviation = np.log(values / price)
    total = weights.sum()
    mean = float((weights * deviation).sum() / total)
    found = {
        "mean |log|": PriceDistribution(price, tuple(values), tuple(weights)).spread,  # the library's
        "std log": float(np.sqrt((weights * (deviation - mean) ** 2).sum() / total)),
        "half IQR log": (
            weighted_quantile(deviation, weights, 0.75) - weighted_quantile(deviation, weights, 0.25)
        )
        / 2,
    }
    for level in LEVELS:
        tail = (1 - level) / 2
        found[level] = (
            weighted_quantile(values, weights, tail),
            weighted_quantile(values, weights, 1 - tail),
        )
    return found


def compact(distribution) -> tuple[list[float] | None, list[float] | None]:
    """A distribution's atoms, equal prices merged and weights below 1e-6 left out (for the saved file)."""
    if distribution is None:
        return None, None
    merged: dict[float, float] = defaultdict(float)
    for value, weight in zip(distribution.values, distribution.weights, strict=True):
        merged[value] += weight
    kept = {v: w for v, w in merged.items() if w >= 1e-6 or v == distribution.price}
    return list(kept), list(kept.values())


def answer_split(loaded, constraint, paths, samples, batch_size, chunk, timings) -> list[dict]:
    """Per photo: the greedy price and category, the digit distribution of its price and the sampled prices,
    answered chunk by chunk in three timed ways."""
    found = []
    fmt = loaded.prompt
    warm = [load_image(p) for p in paths[:batch_size]]  # untimed: first calls pay one-off costs
    for kwargs in ({}, {"price_spread": True}, {"temperature": 1.0}):
        generate_completions(
            loaded.model,
            loaded.processor,
            warm,
            fmt,
            batch_size,
            progress=False,
            constraint=constraint,
            **kwargs,
        )
    for start in range(0, len(paths), chunk):
        images = [load_image(p) for p in paths[start : start + chunk]]
        common = {"prompt": fmt, "batch_size": batch_size, "progress": False, "constraint": constraint}
        t0 = time.perf_counter()
        plain = generate_completions(loaded.model, loaded.processor, images, **common)
        t1 = time.perf_counter()
        spread = generate_completions(loaded.model, loaded.processor, images, price_spread=True, **common)
        t2 = time.perf_counter()
        sampled = generate_completions(
            loaded.model, loaded.processor, images * samples, temperature=1.0, **common
        )
        t3 = time.perf_counter()
        timings["greedy"] += t1 - t0
        timings["greedy + digit distribution"] += t2 - t1
        timings[f"{samples} samples"] += t3 - t2
        timings["photos"] += len(images)
        print(f"  {start + len(images)}/{len(paths)} photos", file=sys.stderr, flush=True)
        if [c.text for c in plain] != [c.text for c in spread]:
            raise AssertionError("recording the price distribution changed a greedy answer")
        for k, completion in enumerate(spread):
            parsed = parse_answer(completion.text, fmt)
            values, weights = compact(completion.price_distribution)
            draws = [parse_answer(sampled[k + j * len(images)].text, fmt).price for j in range(samples)]
            found.append(
                {
                    "price": parsed.price,
                    "category": parsed.category,
                    "values": values,
                    "weights": weights,
                    "samples": [d for d in draws if d is not None],
                }
            )
    return found


def sample_summary(draws: list[float]) -> tuple[float, float]:
    """Median of the sampled prices and their mean absolute log deviation from it."""
    if not draws:
        return math.nan, math.nan
    logs = np.log(np.asarray(draws))
    center = float(np.median(logs))
    return math.exp(center), float(np.abs(logs - center).mean())


def locally_weighted(
    val_true, val_price, val_spread, test_true, test_price, test_spread, level, floor=DEFAULT_FLOOR
):
    """Split conformal on ``|ln(y / p)| / (s + floor)``: the test ranges' coverage and relative widths."""
    q = conformal_quantile(nonconformity(val_true, val_price, val_spread, floor), level)
    p = np.asarray(test_price, dtype=np.float64)
    half = q * (np.asarray(test_spread, dtype=np.float64) + floor)
    return coverage(test_true, p * np.exp(-half), p * np.exp(half))


def conformalized_quantiles(val_true, val_bounds, test_true, test_bounds, level):
    """CQR in log price: widen each item's (low, high) by the calibration quantile of max(low - y, y - high)."""

    def scores(true, bounds):
        y = np.log(np.asarray(true, dtype=np.float64))
        low, high = np.log(bounds[:, 0]), np.log(bounds[:, 1])
        return np.where(np.isfinite(low) & np.isfinite(high), np.maximum(low - y, y - high), np.inf)

    q = conformal_quantile(scores(val_true, val_bounds), level)
    return coverage(test_true, test_bounds[:, 0] * np.exp(-q), test_bounds[:, 1] * np.exp(q))


def sample_bounds(draws: list[list[float]], level: float) -> np.ndarray:
    tail = (1 - level) / 2
    return np.array([np.quantile(d, [tail, 1 - tail]) if d else [np.nan, np.nan] for d in draws])


def category_bounds(categories: list[str | None], train, level: float) -> np.ndarray:
    """The central ``level`` range of the train prices of each answer's category (all train prices if unknown)."""
    tail = (1 - level) / 2
    by_category = {c: rows.to_numpy() for c, rows in train.groupby("category")["full_price"]}
    everything = train["full_price"].to_numpy()
    return np.array([np.quantile(by_category.get(c, everything), [tail, 1 - tail]) for c in categories])


def methods(val: list[dict], test: list[dict], val_true, test_true, train) -> dict[str, dict[float, tuple]]:
    """Coverage and widths of every method at every level."""
    found: dict[str, dict[float, tuple]] = defaultdict(dict)
    column = {
        name: [[item[name] for item in split] for split in (val, test)] for name in ("price", "category")
    }
    spreads = [[digit_spreads(item) for item in split] for split in (val, test)]
    draws = [[item["samples"] for item in split] for split in (val, test)]
    summaries = [[sample_summary(d) for d in split] for split in draws]
    samples = max(len(d) for d in draws[0])
    for level in LEVELS:
        found["greedy, fixed width"][level] = locally_weighted(
            val_true,
            column["price"][0],
            [0.0] * len(val),
            test_true,
            column["price"][1],
            [0.0] * len(test),
            level,
        )
        for name in SPREADS:
            val_spread = [s[name] for s in spreads[0]]
            test_spread = [s[name] for s in spreads[1]]
            found[f"digit tokens: {name}"][level] = locally_weighted(
                val_true, column["price"][0], val_spread, test_true, column["price"][1], test_spread, level
            )
            typical = float(np.nanmedian(val_spread))  # floor: the median val spread (half adaptive)
            found[f"digit tokens: {name} + median floor"][level] = locally_weighted(
                val_true,
                column["price"][0],
                val_spread,
                test_true,
                column["price"][1],
                test_spread,
                level,
                max(typical, DEFAULT_FLOOR),
            )
        chosen = calibrate(val_true, column["price"][0], [s["mean |log|"] for s in spreads[0]])
        low, high = chosen.intervals(column["price"][1], [s["mean |log|"] for s in spreads[1]], level)
        found["digit tokens: mean |log|, floor chosen on val (the library's)"][level] = coverage(
            test_true, low, high
        )
        found["digit tokens: quantiles, CQR"][level] = conformalized_quantiles(
            val_true,
            np.array([s[level] for s in spreads[0]]),
            test_true,
            np.array([s[level] for s in spreads[1]]),
            level,
        )
        found[f"{samples} samples: median, mean |log|"][level] = locally_weighted(
            val_true,
            [c for c, _ in summaries[0]],
            [s for _, s in summaries[0]],
            test_true,
            [c for c, _ in summaries[1]],
            [s for _, s in summaries[1]],
            level,
        )
        chosen = calibrate(val_true, [c for c, _ in summaries[0]], [s for _, s in summaries[0]])
        low, high = chosen.intervals([c for c, _ in summaries[1]], [s for _, s in summaries[1]], level)
        found[f"{samples} samples: median, mean |log|, floor chosen on val"][level] = coverage(
            test_true, low, high
        )
        found[f"{samples} samples: quantiles, CQR"][level] = conformalized_quantiles(
            val_true, sample_bounds(draws[0], level), test_true, sample_bounds(draws[1], level), level
        )
        raw = category_bounds(column["category"][1], train, level)
        found["category price quantiles (train)"][level] = coverage(test_true, raw[:, 0], raw[:, 1])
        found["category price quantiles, CQR"][level] = conformalized_quantiles(
            val_true, category_bounds(column["category"][0], train, level), test_true, raw, level
        )
    return found


def table(found: dict[str, dict[float, tuple]]) -> str:
    """Coverage, mean relative width at each level, and the median relative width at 80% (a mean is pulled by
    the few widest ranges)."""
    head = " | ".join(f"coverage {level:.0%}" for level in LEVELS)
    widths = " | ".join(f"width {level:.0%}" for level in LEVELS)
    lines = [
        f"| method | {head} | {widths} | median width 80% |",
        "|---|" + "---:|" * (2 * len(LEVELS) + 1),
    ]
    for name, levels in found.items():
        cover = [f"{100 * levels[level][0].mean():.1f}%" for level in LEVELS]
        width = [_percent(np.nanmean(levels[level][1])) for level in LEVELS]
        median = _percent(np.nanmedian(levels[0.8][1]))
        lines.append(f"| {name} | " + " | ".join([*cover, *width, median]) + " |")
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "unbounded" if not np.isfinite(value) else f"{100 * value:,.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default="phivision-demo/run", help="the fine-tuned run")
    parser.add_argument(
        "--data", default="runs/intervals-data", help="dataset whose val calibrates, test measures"
    )
    parser.add_argument("--baseline-data", default="phivision-demo/data", help="train split for the baseline")
    parser.add_argument("--samples", type=int, default=8, help="sampled answers per photo")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64, help="photos per timed chunk (interleaving)")
    parser.add_argument("--limit", type=int, default=0, help="first N photos of each split (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save", help="also write every answer, its distribution and the timings to this JSON"
    )
    parser.add_argument("--load", help="report from a file --save wrote, without answering again")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*max_new_tokens.*")
    torch.manual_seed(args.seed)

    train = load_catalog(args.baseline_data)
    train = train[train["split"] == "train"]
    if args.load:
        saved = json.loads(Path(args.load).read_text())
    else:
        saved = collect(args)
        if args.save:
            Path(args.save).write_text(json.dumps(saved))
    answers, truths, timings = saved["answers"], saved["truths"], saved["timings"]
    print(saved["machine"])
    print(
        f"run {saved['run']}; data {saved['data']}: calibrated on {len(truths['val'])} val photos, "
        f"measured on {len(truths['test'])} test photos; baseline quantiles from the train split of "
        f"{args.baseline_data} ({len(train)} products)\n"
    )
    print(table(methods(answers["val"], answers["test"], truths["val"], truths["test"], train)))
    photos = timings.pop("photos")
    greedy = timings["greedy"] / photos
    print("\n| answering | ms per photo | x greedy |\n|---|---:|---:|")
    for name, seconds in timings.items():
        print(f"| {name} | {1000 * seconds / photos:.1f} | {seconds / photos / greedy:.2f} |")


def collect(args: argparse.Namespace) -> dict:
    """Answer the val and test photos (see :func:`answer_split`); the machine and its load at the end."""
    loaded = load_model(args.run)
    catalog = load_catalog(args.data)
    constraint = AnswerConstraint.for_model(loaded)
    timings: dict[str, float] = defaultdict(float)
    answers, truths = {}, {}
    for split in ("val", "test"):
        rows = catalog[catalog["split"] == split]
        rows = rows.head(args.limit) if args.limit else rows
        paths = [Path(args.data) / p for p in rows["image_path"]]
        truths[split] = rows["full_price"].astype(float).tolist()
        answers[split] = answer_split(
            loaded, constraint, paths, args.samples, args.batch_size, args.chunk, timings
        )
    load = os.getloadavg()
    machine = (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    return {
        "machine": machine,
        "run": args.run,
        "data": args.data,
        "answers": answers,
        "truths": truths,
        "timings": dict(timings),
    }


if __name__ == "__main__":
    main()
