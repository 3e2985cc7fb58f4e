"""Memory of `phivision serve` under concurrent uploads of small files that decode to huge images.

A 6000 x 6000 greyscale PNG of a plain background is under 50 KB on the wire and 108 MB once decoded to RGB. The
benchmark starts `phivision serve` (its own process, a tiny checkpoint, CPU) from one or more source trees, sends
N such uploads at once, and reads the server's resident memory from /proc: before the burst, its peak during the
burst (VmHWM, the kernel's high-water mark, which cannot miss a short spike) and after it. With ``--compare REV``
the same burst also hits the server as it was at git revision REV (extracted with ``git archive``), side by side
in one run; both servers run one after the other, never at the same time.

    python benchmarks/bench_serve_memory.py --compare 6f24dbc            # 12 uploads to /v1/predict
    python benchmarks/bench_serve_memory.py --uploads 12 --route chat    # the same as OpenAI chat requests

Prints a markdown table (MiB = 2**20 bytes).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def big_png(side: int) -> bytes:
    """A plain greyscale backdrop: 47 KiB as a PNG at 6000 px, ``side * side * 3``
    bytes once decoded to RGB."""
    image = Image.new("L", (side, side), 235)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send(url: str, route: str, image: bytes) -> int:
    if route == "predict":
        files = {"image": ("big.png", image, "image/png")}
        return httpx.post(f"{url}/v1/predict", files=files, timeout=600).status_code
    content = [
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
        }
    ]
    body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).status_code


def measure(src: Path, checkpoint: Path, image: bytes, uploads: int, route: str) -> dict:
    """Start the server from ``src``, burst ``uploads`` requests, return memory figures."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = [
        sys.executable,
        "-m",
        "phivision.cli",
        "serve",
        "--model",
        str(checkpoint),
        "--port",
        str(port),
    ]
    command += ["--max-new-tokens", "8"]
    if route == "chat":
        command += ["--served-model-name", "bench"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the server from {src} did not start")
        send(url, route, big_png(64))  # warm up: first generation allocates caches
        time.sleep(1)
        before, _ = memory_mib(server.pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=uploads) as pool:
            codes = list(pool.map(lambda _: send(url, route, image), range(uploads)))
        seconds = time.perf_counter() - started
        time.sleep(1)
        after, peak = memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"before": before, "peak": peak, "after": after, "codes": codes, "seconds": seconds}


def extract(revision: str, into: Path) -> Path:
    """The ``src`` tree of ``revision`` (git archive; the working tree is not touched)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "src"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=12)
    parser.add_argument("--side", type=int, default=6000, help="image side in pixels")
    parser.add_argument("--route", choices=["predict", "chat"], default="predict")
    parser.add_argument("--compare", metavar="REV", help="also measure the server at this git revision")
    args = parser.parse_args()

    from phivision.tiny import write_tiny_checkpoint

    image = big_png(args.side)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        trees = [("this tree", ROOT / "src")]
        if args.compare:
            trees.insert(0, (f"git {args.compare}", extract(args.compare, Path(tmp))))
        print(
            f"{args.uploads} concurrent uploads to {args.route}: {args.side}x{args.side} greyscale PNG, "
            f"{len(image) / 1024:.1f} KiB each, {args.side * args.side * 3 / 2**20:.0f} MiB as RGB"
        )
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
        print(
            "| server | statuses | RSS before (MiB) | peak RSS (MiB) | RSS after (MiB) | peak - before | burst s |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for label, src in trees:
            result = measure(src, checkpoint, image, args.uploads, args.route)
            statuses = ", ".join(
                f"{code} x{result['codes'].count(code)}" for code in sorted(set(result["codes"]))
            )
            print(
                f"| {label} | {statuses} | {result['before']:.0f} | {result['peak']:.0f} | {result['after']:.0f} "
                f"| {result['peak'] - result['before']:.0f} | {result['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
