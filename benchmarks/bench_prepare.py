"""Images per second: `phivision prepare` against a one-at-a-time download loop like the hub cookbook's.

A loopback HTTP server serves a synthetic catalog and adds a fixed latency to every request (a CDN far away).
The baseline fetches each image with ``requests.get``, opens it with Pillow and saves it, one after the other;
`prepare` runs with its defaults. Both read the same URL table and write to fresh directories.

    python benchmarks/bench_prepare.py              # 500 images, 50 ms latency
    python benchmarks/bench_prepare.py --n 200 --latency 0.1
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import requests
from PIL import Image

from phivision.data.prepare import prepare
from phivision.data.sample import write_sample_catalog


class SlowHandler(SimpleHTTPRequestHandler):
    latency = 0.05
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        time.sleep(self.latency)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


def sequential_baseline(table: Path, out: Path) -> int:
    """The cookbook's way: for each row, GET the image, open it, save it; a failure is skipped silently."""
    out.mkdir(parents=True)
    saved = 0
    for i, url in enumerate(pd.read_csv(table)["imageurl"]):
        try:
            response = requests.get(url, timeout=30)
            image = Image.open(io.BytesIO(response.content)).convert("RGB")
            image.save(out / f"{i}.jpg")
            saved += 1
        except Exception:
            continue
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500, help="images")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every request")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        SlowHandler.latency = args.latency
        httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(SlowHandler, directory=str(tmp / "src"))
        )
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        write_sample_catalog(tmp / "src", n=args.n, seed=0, urls_out=tmp / "urls.csv", base_url=base)

        start = time.perf_counter()
        baseline_saved = sequential_baseline(tmp / "urls.csv", tmp / "baseline")
        baseline_s = time.perf_counter() - start

        start = time.perf_counter()
        report = prepare([str(tmp / "urls.csv")], tmp / "prepared", progress=False)
        prepare_s = time.perf_counter() - start
        httpd.shutdown()

    kept = report["counts"]["kept"]
    base_rate, prep_rate = baseline_saved / baseline_s, kept / prepare_s
    print(f"{args.n} images, {args.latency * 1000:.0f} ms latency per request, loopback server")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print()
    print("| method | images | seconds | images/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| sequential requests.get + PIL save (cookbook) | {baseline_saved} | {baseline_s:.2f} | {base_rate:.1f} | 1.0x |"
    )
    print(
        f"| `phivision prepare` (defaults: 32 in flight, validated, atomic writes) | {kept} | {prepare_s:.2f} "
        f"| {prep_rate:.1f} | {prep_rate / base_rate:.1f}x |"
    )


if __name__ == "__main__":
    main()
