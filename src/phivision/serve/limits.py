"""What one ``phivision serve`` process accepts: its bounds, their defaults, and the checks on them.

Kept free of heavy imports (no torch, FastAPI or Pillow) so the CLI can read the defaults for ``--help`` and
check every flag before a model is loaded. Each field is a ``phivision serve`` flag of the same name
(``max_new_tokens`` is ``--max-new-tokens``), so a bad value is reported under the flag the user typed.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass, fields

from phivision.errors import PhivisionError

MB = 1024 * 1024
# The same bound as phivision.data.images.DEFAULT_MAX_PIXELS (a test keeps the two equal); repeated here so that
# reading serve's defaults does not import Pillow and numpy.
DEFAULT_MAX_PIXELS = 40_000_000
# Names a browser sends as Host for a server bound to loopback. Anything else reaching a loopback-only server
# came through a DNS name that points at 127.0.0.1 (DNS rebinding) and is refused.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass
class ServeLimits:
    """The bounds one server enforces; the defaults suit product photos on one GPU."""

    max_batch_size: int = 8  # requests answered by one batched generate call
    max_wait_ms: float = 10.0  # how long a batch waits for more requests to join
    max_batch_pixels: int = (
        DEFAULT_MAX_PIXELS  # decoded pixels one batch may hold (its first image always fits)
    )
    max_upload_mb: float = 10.0  # one image file (multipart upload or decoded data: URL)
    max_pixels: int = DEFAULT_MAX_PIXELS  # one image's width x height, read from its header before decoding
    max_queue: int = 256  # requests waiting for the model
    max_queue_mb: float = 512.0  # image bytes waiting for the model
    max_new_tokens: int = 64  # the longest answer, and the largest max_tokens a chat request may ask for
    body_timeout: float = 60.0  # seconds a client may take to send its request body (then 408)
    answer_timeout: float = 300.0  # seconds a request may wait for its answer (then 504)
    remote_image_timeout: float = 10.0  # seconds for fetching one http(s) image_url, redirects included
    max_redirects: int = 5  # redirects followed when fetching an http(s) image_url
    constrain: bool = True  # force answers into the run's template and categories (--no-constrain: free text)
    price_level: float = (
        0.8  # coverage level of the price ranges (price_low, price_high) of a calibrated model
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_queue_bytes(self) -> int:
        return int(self.max_queue_mb * MB)

    def validate(self) -> ServeLimits:
        """Raise :class:`PhivisionError` naming the flag of the first value out of range; return self."""
        minimum = {"max_wait_ms": 0, "max_redirects": 0}  # may be zero; everything else must be positive
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                continue
            flag = "--" + field.name.replace("_", "-")
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise PhivisionError(f"{flag} {value!r}: expected a whole number")
            if isinstance(value, float) and not math.isfinite(value):
                raise PhivisionError(f"{flag} {value!r}: expected a finite number")
            low = minimum.get(field.name)
            if low is None and not value > 0:
                raise PhivisionError(f"{flag} {value!r}: must be greater than 0")
            if low is not None and value < low:
                raise PhivisionError(f"{flag} {value!r}: must be at least {low}")
        if not self.price_level < 1:
            raise PhivisionError(
                f"--price-level {self.price_level!r}: must be strictly between 0 and 1 (e.g. 0.8)"
            )
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str] | None:
    """Host header names the server answers: loopback names when bound to loopback, plus ``extra``; None (any
    name) when bound elsewhere without ``extra``."""
    names = {name.lower().strip("[]") for name in extra}
    if is_loopback(bind_host):
        names |= LOOPBACK_HOSTS | {bind_host.lower().strip("[]")}
    return frozenset(names) or None


def check_bind(host: str, port: int) -> None:
    """Fail with the flag's name, before a model is loaded, when ``host:port`` cannot be listened on."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PhivisionError(f"--port: expected a TCP port from 1 to 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise PhivisionError(f"--host {host!r}: not an address of this machine ({err})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as err:
            reason = err.strerror or str(err)
            raise PhivisionError(f"--host {host} --port {port}: cannot listen there ({reason})") from None
