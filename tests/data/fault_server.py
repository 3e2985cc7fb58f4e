"""A loopback HTTP server with the faults real image hosts have, and helpers that write source tables."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_bytes(color=(200, 30, 40), size=(64, 48), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_bytes() -> bytes:
    """8000 x 8000 pixels (64 MP, above the 40 MP default limit) in about 8 kB of PNG."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")
    return buffer.getvalue()


class FaultServer:
    """Serves ``/<fault>/<name>`` on 127.0.0.1. ``name`` picks the image from ``files`` (default: a JPEG).

    Faults: ``img`` (fine), ``404``, ``500`` (500 on the first request, then fine), ``429`` (429 with
    ``Retry-After: 1`` first, then fine), ``slow`` (headers after ``slow_s``), ``truncated`` (half an image,
    honest Content-Length), ``short`` (Content-Length of the whole image, half sent, connection closed),
    ``html`` (an error page with status 200), ``empty`` (200, zero bytes), ``redirect`` (302 to ``/img/<name>``),
    ``gzip`` (a plain JPEG labelled ``Content-Encoding: gzip``), ``drip`` (the image one byte every ``drip_s``
    seconds: every read is quick, the whole never ends in time), ``metadata`` (302 to the cloud metadata address
    169.254.169.254), ``ftp`` (302 to an ftp:// URL). ``counts`` holds the requests per path (as sent, so
    non-ASCII names arrive percent-encoded), ``times`` their arrival times.
    """

    def __init__(self, delay: float = 0.0, slow_s: float = 1.0, drip_s: float = 0.05) -> None:
        self.files: dict[str, bytes] = {}
        self.counts: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.delay = delay
        self.slow_s = slow_s
        self.drip_s = drip_s
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def body(self, name: str) -> bytes:
        return self.files.get(name) or image_bytes()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path
        with self.lock:
            self.counts[path] += 1
            nth = self.counts[path]
            self.times.setdefault(path, []).append(time.monotonic())
        fault, _, name = path.lstrip("/").partition("/")
        if self.delay:
            time.sleep(self.delay)
        if fault == "404":
            return self.send(request, 404, b"not found", "text/plain")
        if fault == "500" and nth == 1:
            return self.send(request, 500, b"oops", "text/plain")
        if fault == "429" and nth == 1:
            return self.send(request, 429, b"slow down", "text/plain", {"Retry-After": "1"})
        if fault == "slow":
            time.sleep(self.slow_s)
        if fault == "redirect":
            return self.send(request, 302, b"", "text/plain", {"Location": f"/img/{name}"})
        if fault == "metadata":
            location = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
            return self.send(request, 302, b"", "text/plain", {"Location": location})
        if fault == "ftp":
            return self.send(request, 302, b"", "text/plain", {"Location": f"ftp://127.0.0.1/{name}"})
        if fault == "html":
            return self.send(request, 200, b"<html><body>Image not available</body></html>", "text/html")
        if fault == "empty":
            return self.send(request, 200, b"", "image/jpeg")
        data = self.body(name)
        if fault == "gzip":
            return self.send(request, 200, data, "image/jpeg", {"Content-Encoding": "gzip"})
        if fault == "drip":
            request.send_response(200)
            request.send_header("Content-Type", "image/jpeg")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            for i in range(len(data)):
                request.wfile.write(data[i : i + 1])
                request.wfile.flush()
                time.sleep(self.drip_s)
            return None
        if fault == "truncated":
            return self.send(request, 200, data[: len(data) // 2], "image/jpeg")
        if fault == "short":
            request.send_response(200)
            request.send_header("Content-Type", "image/jpeg")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data[: len(data) // 2])
            request.wfile.flush()
            request.close_connection = True
            return None
        return self.send(request, 200, data, "image/jpeg")

    @staticmethod
    def send(request, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        request.send_response(status)
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(data)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def dbq_row(code, title, category, price, url, currency="USD", **extra) -> dict:
    """One row in the DBQ schema (the defaults of `phivision prepare`)."""
    return {
        "product_code": code,
        "title": title,
        "category1_code": "accessories",
        "category2_code": "bags",
        "category3_code": category,
        "full_price": price,
        "currency_code": currency,
        "imageurl": url,
        **extra,
    }
