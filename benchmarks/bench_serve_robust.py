"""`phivision serve` under hostile load: slow clients, a flood of half-sent requests, 200 concurrent chats, bad
requests mixed into steady traffic, and stalled remote images. Prints one table, each server side by side.

Each variant is a real `phivision serve` process (a tiny checkpoint, on loopback) started from a source tree:
``--src`` this checkout's ``src`` (default) and, with ``--baseline-src DIR``, another one (e.g. ``git archive
main src | tar -x -C /tmp/main``) for the before/after comparison. Every scenario gets a fresh server; its peak
RSS and open files are sampled from /proc every 0.2 s and its log (stderr) is measured. Each server starts with
a soft limit of ``--server-open-files`` (1,024, a login shell's usual default) open files, the hard limit left as
it is: what a server does when a flood reaches that limit is part of what is measured.

    python benchmarks/bench_serve_robust.py --model CKPT --baseline-src /tmp/main/src
    python benchmarks/bench_serve_robust.py --model CKPT --scenarios chats,stalls --quick

Scenarios (sizes with ``--quick`` in brackets):

* ``trickle``: 1,000 [100] connections that send a request's first header line, then one byte every second.
  After 40 s [8 s]: how many the server still holds open, and how fast /healthz answers meanwhile.
* ``half_sent``: 10,000 [500] connections that send complete headers announcing a 1 KB body, then nothing
  (opening stops after 20 connections in a row fail to connect within 1 s). Open files and memory of the server,
  /healthz as the burst ends and 2 s later (while the flood holds its connections), and log growth.
* ``chats``: 200 [40] concurrent chat requests (data: PNG, max_tokens 8) from the official ``openai`` client:
  how many succeed, latency p50/p95/max.
* ``mixed``: 16 [4] clients sending chats for 30 s [10 s], plus one bad request a second (alternately
  ``temperature: 1e-300`` and a text part holding a lone surrogate): how many good requests succeed, what the
  bad ones get, and how often /healthz said 503.
* ``stalls``: 45 chats whose image URL points at a host that accepts and never answers (``--allow-remote-images
  --allow-private-image-hosts``), then one chat with a data: URL: its latency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import httpx
from PIL import Image

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE.parent / "tests" / "serve"))
from serve_helpers import silent_host  # noqa: E402  (the stalled image host the tests use)

MODEL_NAME = "tiny"


# ------------------------------------------------------------------------------------------ the server


def png_data_url(seed: int = 0) -> str:
    image = Image.new("RGB", (96, 72), (40 + seed % 200, 90, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`phivision serve` from one source tree, with /proc sampling of its memory and open files."""

    def __init__(self, src: Path, model: str, extra: list[str], open_files: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        args = [
            "serve",
            "--model",
            model,
            "--port",
            str(self.port),
            "--served-model-name",
            MODEL_NAME,
            *extra,
        ]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phivision.cli", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=(lambda: _soft_open_files(open_files)) if open_files else None,
        )
        self.peak_rss = 0
        self.peak_fds = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("the server did not start")
        self.log_start = self.log_bytes()
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        Path(self.log.name).unlink(missing_ok=True)

    def log_bytes(self) -> int:
        return os.path.getsize(self.log.name)

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.process.pid}/fd"))
        except OSError:
            return 0

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss_mb())
            self.peak_fds = max(self.peak_fds, self.fds())
            self._stop.wait(0.2)

    def resources(self) -> dict:
        return {
            "peak RSS (MB)": round(self.peak_rss),
            "peak open files": self.peak_fds,
            "log growth (KB)": round((self.log_bytes() - self.log_start) / 1024, 1),
        }


def _soft_open_files(limit: int) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))


def healthz_latency(url: str, timeout: float = 30.0) -> str:
    start = time.monotonic()
    try:
        code = httpx.get(url + "/healthz", timeout=timeout).status_code
    except httpx.HTTPError as err:
        return f"failed ({type(err).__name__}) after {time.monotonic() - start:.1f} s"
    return f"{code} in {time.monotonic() - start:.2f} s"


def chat_body(url: str, text: str | None = None, temperature: float | None = None) -> dict:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    if temperature is not None:
        body["temperature"] = temperature
    return body


# ------------------------------------------------------------------------------------------ scenarios


def scenario_trickle(server: Server, quick: bool) -> dict:
    count, wait = (100, 8.0) if quick else (1000, 40.0)
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.setblocking(False)
        sockets.append(sock)
    start = time.monotonic()
    health = ""
    while time.monotonic() - start < wait:
        for sock in sockets:
            with suppress(OSError):
                sock.send(b"x")  # one byte a second: a header that never ends
        if not health and time.monotonic() - start > wait / 2:
            health = healthz_latency(server.url)
        time.sleep(1.0)
    still_open = sum(_open(sock) for sock in sockets)
    for sock in sockets:
        sock.close()
    return {
        "connections": count,
        f"held open after {wait:g} s": still_open,
        "/healthz meanwhile": health,
        **server.resources(),
    }


def _open(sock: socket.socket) -> bool:
    """The server has not closed this connection (nothing, or only a response, to read)."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return True
    except OSError:
        return False
    if data == b"":
        return False
    try:  # a response (408) followed by the close
        return sock.recv(65536) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def scenario_half_sent(server: Server, quick: bool) -> dict:
    count = 500 if quick else 10_000
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    sockets, refused, in_a_row = [], 0, 0
    start = time.monotonic()
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=1)
            sock.sendall(head)
            sockets.append(sock)
            in_a_row = 0
        except OSError:
            refused += 1
            in_a_row += 1
            if in_a_row == 20:  # the server no longer accepts: stop knocking
                break
    opened = time.monotonic() - start
    health = healthz_latency(server.url)
    time.sleep(2.0)
    health_later = healthz_latency(server.url)
    time.sleep(1.0)
    answered_503 = 0
    for sock in sockets:
        sock.setblocking(False)
        with suppress(OSError):
            answered_503 += sock.recv(64).startswith(b"HTTP/1.1 503")
        sock.close()
    return {
        "connections tried": len(sockets) + refused,
        "connect failed": refused,
        "answered 503 at once (over the cap)": answered_503,
        "seconds to open them": round(opened, 1),
        "/healthz as the burst ends": health,
        "/healthz 2 s later (flood still held)": health_later,
        **server.resources(),
    }


def scenario_chats(server: Server, quick: bool) -> dict:
    from openai import AsyncOpenAI

    count = 40 if quick else 200

    async def run() -> list[tuple[str, float]]:
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
        limits = httpx.Limits(max_connections=count + 10)
        client._client = httpx.AsyncClient(limits=limits, timeout=600)  # the default pool holds 100

        async def one(i: int) -> tuple[str, float]:
            start = time.monotonic()
            try:
                await client.chat.completions.create(**chat_body(png_data_url(i)))
                return "200", time.monotonic() - start
            except Exception as err:  # noqa: BLE001  (counted by kind)
                return str(getattr(err, "status_code", type(err).__name__)), time.monotonic() - start

        return await asyncio.gather(*(one(i) for i in range(count)))

    start = time.monotonic()
    results = asyncio.run(run())
    wall = time.monotonic() - start
    latencies = sorted(t for code, t in results if code == "200")
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    return {
        "requests": count,
        "succeeded": codes.get("200", 0),
        "status codes": ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())),
        "latency p50 / p95 / max (s)": _quantiles(latencies),
        "wall (s)": round(wall, 1),
        **server.resources(),
    }


def _quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
    return f"{statistics.median(values):.2f} / {p95:.2f} / {values[-1]:.2f}"


def scenario_mixed(server: Server, quick: bool) -> dict:
    clients, seconds = (4, 10.0) if quick else (16, 30.0)
    good: dict[str, int] = {}
    bad: dict[str, int] = {}
    health: dict[int, int] = {}
    stop = time.monotonic() + seconds
    url = server.url + "/v1/chat/completions"

    def steady(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop:
                code = str(client.post(url, json=chat_body(png_data_url(i))).status_code)
                good[code] = good.get(code, 0) + 1

    def hostile() -> None:
        k = 0
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop:
                if k % 2 == 0:
                    body = json.dumps(chat_body(png_data_url(99), temperature=1e-300))
                else:  # json.dumps writes the lone surrogate as the escape \ud800, as a client would
                    body = json.dumps(chat_body(png_data_url(99), text="\ud800x"))
                response = client.post(url, content=body, headers={"content-type": "application/json"})
                kind = "temperature 1e-300" if k % 2 == 0 else "lone surrogate"
                bad[f"{kind}: {response.status_code}"] = bad.get(f"{kind}: {response.status_code}", 0) + 1
                k += 1
                time.sleep(1.0)

    def watch() -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < stop + 3:
                code = client.get(server.url + "/healthz").status_code
                health[code] = health.get(code, 0) + 1
                time.sleep(1.0)

    threads = [threading.Thread(target=steady, args=(i,)) for i in range(clients)]
    threads += [threading.Thread(target=hostile), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(good.values())
    return {
        "steady clients": clients,
        "good requests succeeded": f"{good.get('200', 0)} of {total}",
        "good status codes": ", ".join(f"{k}: {v}" for k, v in sorted(good.items())),
        "bad requests got": ", ".join(f"{k} x{v}" for k, v in sorted(bad.items())),
        "/healthz samples": ", ".join(f"{k}: {v}" for k, v in sorted(health.items())),
        **server.resources(),
    }


def scenario_stalls(server: Server, quick: bool) -> dict:
    stalled = 45
    url = server.url + "/v1/chat/completions"
    with silent_host() as (port, _):
        remote: dict[str, int] = {}

        def fetch(i: int) -> None:
            body = chat_body(f"http://127.0.0.1:{port}/photo-{i}.png")
            code = str(httpx.post(url, json=body, timeout=120).status_code)
            remote[code] = remote.get(code, 0) + 1

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(stalled)]
        for thread in threads:
            thread.start()
        during: dict[str, str] = {}

        def probe(label: str, delay: float) -> None:  # a data: request sent `delay` s into the stalls
            time.sleep(delay)
            start = time.monotonic()
            code = httpx.post(url, json=chat_body(png_data_url(7)), timeout=120).status_code
            during[label] = f"{code} in {time.monotonic() - start:.2f} s"

        probes = [threading.Thread(target=probe, args=a) for a in (("0.5 s", 0.5), ("3 s", 3.0))]
        for thread in probes:
            thread.start()
        for thread in threads + probes:
            thread.join()
    baseline_start = time.monotonic()
    httpx.post(url, json=chat_body(png_data_url(8)), timeout=120)
    idle = time.monotonic() - baseline_start
    return {
        "stalled remote requests": stalled,
        "data: request sent 0.5 s into the stalls": during["0.5 s"],
        "data: request sent 3 s into the stalls": during["3 s"],
        "data: request on an idle server": f"{idle:.2f} s",
        "the stalled requests got": ", ".join(f"{k}: {v}" for k, v in sorted(remote.items())),
        **server.resources(),
    }


SCENARIOS = {
    "trickle": (scenario_trickle, []),
    "half_sent": (scenario_half_sent, []),
    "chats": (scenario_chats, []),
    "mixed": (scenario_mixed, []),
    "stalls": (scenario_stalls, ["--allow-remote-images", "--allow-private-image-hosts"]),
}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="a checkpoint or RUN (e.g. `phivision tiny --out CKPT`)"
    )
    parser.add_argument("--src", type=Path, default=SRC, help="the source tree to test (default: this one)")
    parser.add_argument("--baseline-src", type=Path, help="a second source tree, side by side (e.g. main)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument(
        "--server-open-files",
        type=int,
        default=1024,
        help="each server's soft limit on open files (0: inherit)",
    )
    args = parser.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the flood's own sockets
    variants = [("this branch", args.src)]
    if args.baseline_src is not None:
        variants.insert(0, ("baseline", args.baseline_src))
    print(
        f"# machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"# load before: {os.getloadavg()[0]:.2f} (1-min average), quick={args.quick}")
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for name in args.scenarios.split(","):
        function, flags = SCENARIOS[name]
        for label, src in variants:  # interleaved: each scenario runs on every variant before the next
            extra = []
            if args.quick and "header_timeout" in (src / "phivision" / "args.py").read_text():
                extra = ["--header-timeout", "4"]  # within the quick trickle's 8 s (the default is 15 s)
            with Server(src, args.model, flags + extra, args.server_open_files) as server:
                result = function(server, args.quick)
            for key, value in result.items():
                rows.setdefault((name, key), {})[label] = value
            print(f"# {name} on {label}: done (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    labels = [label for label, _ in variants]
    print("| scenario | measure | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for (name, key), values in rows.items():
        print(f"| {name} | {key} | " + " | ".join(str(values.get(label, "")) for label in labels) + " |")
    print(f"# load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
