"""Seconds for `phivision inspect` on a 3,000-product dataset (issue target: under a minute on 2 cores).

Two datasets of ``--n`` products: the synthetic catalog of `phivision sample` (drawings of 256 to 672 px, about
10 kB each) and photo-like JPEGs of 1,000 to 1,600 px a side (smooth colour fields plus grain, about 250 kB, the
size of a catalog's product photos). Each is inspected ``--repeat`` times; the table gives every run's wall time,
its phases (reading the catalog and scanning the images; findings, including the lazy import of the model's
geometry in the first run; the page), and the CPU seconds the process used (all threads), which depend little on
what else runs on the machine: on 2 idle cores the wall time is about the scan's CPU time over 2 plus the rest.

    python benchmarks/bench_inspect.py                           # 3000 products, 2 runs per dataset
    python benchmarks/bench_inspect.py --data /tmp/bench-inspect # keep the datasets for the next run
    python benchmarks/bench_inspect.py --n 500 --repeat 1
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from phivision.api import inspect
from phivision.data.sample import write_sample_catalog
from phivision.io import atomic_write_parquet


def photo_dataset(directory: Path, n: int, seed: int = 0) -> Path:
    """``n`` photo-like JPEGs and a catalog over them (6 categories, an 80/10/10 split)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        size = (int(rng.integers(1000, 1600)), int(rng.integers(1000, 1600)))
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").resize(size)
        grain = rng.normal(0, 4, (size[1], size[0], 1))
        pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        (directory / "images" / f"{i}.jpg").write_bytes(buffer.getvalue())
        category = f"category-{i % 6}"
        rows.append(
            {
                "product_code": f"P{i:05d}",
                "title": f"Product {i // 2}",
                "category": category,
                "full_price": float(round(100 * (1 + i % 6) * pick.lognormvariate(0, 0.3))),
                "currency": "USD",
                "image_path": f"images/{i}.jpg",
                "split": pick.choices(["train", "val", "test"], [8, 1, 1])[0],
            }
        )
    atomic_write_parquet(directory / "catalog.parquet", pd.DataFrame(rows))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=3000, help="products per dataset")
    parser.add_argument("--repeat", type=int, default=2, help="inspect runs per dataset")
    parser.add_argument(
        "--data", type=Path, help="build the datasets here once and reuse them (default: a temp dir)"
    )
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print()
    print("| dataset | products | image MB | run | wall s | scan s | findings s | page s | CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        start = time.perf_counter()
        datasets = {
            "`sample` drawings": root / f"sample-{args.n}",
            "photo-like JPEGs": root / f"photos-{args.n}",
        }
        if not (datasets["`sample` drawings"] / "catalog.parquet").exists():
            write_sample_catalog(datasets["`sample` drawings"], n=args.n, seed=0)
        if not (datasets["photo-like JPEGs"] / "catalog.parquet").exists():
            photo_dataset(datasets["photo-like JPEGs"], args.n)
        built = time.perf_counter() - start
        for name, directory in datasets.items():
            megabytes = sum(p.stat().st_size for p in (directory / "images").iterdir()) / 1e6
            for run in range(1, args.repeat + 1):
                cpu = time.process_time()
                result = inspect(directory, progress=False)
                cpu = time.process_time() - cpu
                t = result["timings"]
                print(
                    f"| {name} | {result['rows']} | {megabytes:.0f} | {run} | {result['seconds']:.1f} | "
                    f"{t['read_and_scan_images']:.1f} | {t['findings']:.1f} | {t['page']:.1f} | {cpu:.1f} |",
                    flush=True,
                )
    print()
    print(f"(building the datasets took {built:.0f} s, not counted; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
