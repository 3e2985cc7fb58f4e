"""Bootstrap intervals for the report: the vectorised resampling against a plain loop over resampled records.

For each test-set size the script scores synthetic answers (50 categories), then times ``bootstrap_intervals``
(1000 resamples, every headline metric) and, for comparison, the plain way: build each resample as a list of
records and call ``summarize`` on it (timed on a few resamples, scaled to 1000). Both compute the same numbers
(the tests check that). Times are CPU seconds of the process, so a busy machine changes them little; the wall
time of the vectorised run is printed too. Run from the repository root:

    python benchmarks/bench_report.py [--sizes 100,1000,10000,50000] [--loop-resamples 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from phivision.answer.prompt import ParsedAnswer
from phivision.evaluate.bootstrap import RESAMPLES, bootstrap_intervals, resample_counts
from phivision.evaluate.metrics import TrainStats, score, summarize


def scored(n: int, n_categories: int = 50, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    categories = [f"category {i}" for i in range(n_categories)]
    truths = pd.DataFrame(
        {
            "title": [f"title {i}" for i in range(n)],
            "category": [categories[i] for i in rng.integers(n_categories, size=n)],
            "full_price": rng.lognormal(5, 1.2, size=n),
        }
    )
    answers = [
        ParsedAnswer(
            row.title if rng.random() < 0.5 else "other",
            row.category if rng.random() < 0.7 else categories[rng.integers(n_categories)],
            None if rng.random() < 0.1 else row.full_price * float(rng.lognormal(0, 0.4)),
        )
        for row in truths.itertuples()
    ]
    return score(truths, answers, TrainStats.from_catalog(truths))


def time_loop(records: list[dict], resamples: int) -> float:
    """CPU seconds per resample for the plain way: materialise the resampled records, summarize them."""
    started = time.process_time()
    for counts in resample_counts(len(records), resamples, seed=0):
        for row in counts:
            summarize([r for r, k in zip(records, row, strict=True) for _ in range(int(k))])
    return (time.process_time() - started) / resamples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000,50000")
    parser.add_argument("--loop-resamples", type=int, default=20)
    args = parser.parse_args()
    print(
        f"{RESAMPLES} resamples, every metric; CPU seconds of this process (wall seconds depend on the load)"
    )
    print(
        f"{'items':>8} {'vectorised wall s':>18} {'vectorised CPU s':>17} {'plain loop CPU s':>17} {'ratio':>7}"
    )
    for n in [int(s) for s in args.sizes.split(",")]:
        records = scored(n)
        wall, cpu = time.perf_counter(), time.process_time()
        bootstrap_intervals(records)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        slow = time_loop(records, args.loop_resamples) * RESAMPLES
        print(f"{n:>8,} {wall:>18.2f} {cpu:>17.2f} {slow:>17.1f} {slow / cpu:>6.0f}x")


if __name__ == "__main__":
    main()
