"""Images per second: `phivision prepare` against a one-at-a-time download loop like the hub cookbook's.

A loopback HTTP server serves a synthetic catalog and adds a fixed latency to every request (a CDN far away).
The baseline fetches each image with ``requests.get``, opens it with Pillow and saves it, one after the other;
`prepare` runs with its defaults (64 downloads in flight, 32 per host; every image here comes from one host, as
in a real catalog served by one CDN). Both read the same URL table and write to fresh directories; `prepare` is
timed ``--repeat`` times (each into a fresh directory, so every run downloads everything): the table shows the
median and the first run, which also pays one-time costs (worker threads, connections, lazy imports).

    python benchmarks/bench_prepare.py              # 500 images, 50 ms latency
    python benchmarks/bench_prepare.py --n 200 --latency 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import requests
from PIL import Image

from phivision.api import prepare
from phivision.args import Download
from phivision.data.sample import write_sample_catalog


def serve(directory: Path, latency: float, ports: multiprocessing.Queue) -> None:
    """A minimal asyncio HTTP/1.1 server (keep-alive, GET only): it answers each request after ``latency``
    seconds without holding a thread, and keeps files in memory, so that the server, which shares the CPU with
    the client here, is not what limits the measurement."""
    cache: dict[str, bytes] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1].decode()
                await asyncio.sleep(latency)
                if path not in cache:
                    file = directory / path.lstrip("/")
                    cache[path] = file.read_bytes() if file.is_file() else b""
                data = cache[path]
                status = b"200 OK" if data else b"404 Not Found"
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                    % (status, len(data))
                )
                writer.write(data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


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
    parser.add_argument("--concurrency", type=int, default=Download.concurrency, help="prepare's setting")
    parser.add_argument("--per-host", type=int, default=Download.per_host, help="prepare's setting")
    parser.add_argument("--repeat", type=int, default=3, help="prepare runs; the median is reported")
    parser.add_argument("--skip-baseline", action="store_true", help="time only prepare")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the server runs in its own process, so it does not compete with the client for the GIL
        ports = multiprocessing.Queue()
        server = multiprocessing.Process(target=serve, args=(tmp / "src", args.latency, ports), daemon=True)
        server.start()
        base = f"http://127.0.0.1:{ports.get(timeout=60)}"
        write_sample_catalog(tmp / "src", n=args.n, seed=0, urls_out=tmp / "urls.csv", base_url=base)

        baseline_saved, baseline_s = 0, float("nan")
        if not args.skip_baseline:
            start = time.perf_counter()
            baseline_saved = sequential_baseline(tmp / "urls.csv", tmp / "baseline")
            baseline_s = time.perf_counter() - start

        runs = []
        for run in range(max(1, args.repeat)):
            start = time.perf_counter()
            report = prepare(
                str(tmp / "urls.csv"),
                tmp / f"prepared{run}",
                concurrency=args.concurrency,
                per_host=args.per_host,
                progress=False,
            )
            runs.append(time.perf_counter() - start)
            assert report["images"]["downloaded"] == report["counts"]["kept"]  # nothing reused
        prepare_s = statistics.median(runs)
        server.terminate()

    kept = report["counts"]["kept"]
    base_rate, prep_rate = baseline_saved / baseline_s, kept / prepare_s
    print(f"{args.n} images, {args.latency * 1000:.0f} ms latency per request, loopback server")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"prepare runs (s): {', '.join(f'{s:.2f}' for s in runs)}; median reported")
    print()
    print("| method | images | seconds | images/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| sequential requests.get + PIL save (cookbook) | {baseline_saved} | {baseline_s:.2f} | {base_rate:.1f} | 1.0x |"
    )
    label = f"`phivision prepare` ({args.concurrency} in flight, {args.per_host} per host, validated, atomic writes)"
    print(
        f"| {label}, median of {len(runs)} | {kept} | {prepare_s:.2f} | {prep_rate:.1f} | {prep_rate / base_rate:.1f}x |"
    )
    if len(runs) > 1:  # the first run also pays one-time costs (threads, connections, lazy imports)
        first_rate = kept / runs[0]
        print(
            f"| {label}, first run | {kept} | {runs[0]:.2f} | {first_rate:.1f} | {first_rate / base_rate:.1f}x |"
        )


if __name__ == "__main__":
    main()
