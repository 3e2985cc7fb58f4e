"""What keeps ``phivision serve`` up under slow or flooding clients: bounds on connections, not on requests.

uvicorn alone waits for a request's headers for ever and accepts connections until the process runs out of file
descriptors, and it logs every bad request. Here:

* **Connections** are capped (``max_connections``): one more is answered ``503`` and closed at once, before a
  byte of it is read, so file descriptors and memory stay bounded whatever a client opens. A few slots beyond
  the cap serve ``/healthz`` only, so health checks are answered during a flood.
* **Request headers** must be complete within ``header_timeout`` seconds of the connection (or of the end of
  the previous response on a kept-alive connection): a client that trickles its headers, or opens a connection
  and sends nothing, is answered ``408`` (or, if it sent nothing, just closed). The request body has its own
  deadline (``--body-timeout``, in :class:`phivision.serve.server.BodyGuard`); idle kept-alive connections close
  after ``keep_alive_timeout``. h11 refuses request heads over 16 KB (its own bound, kept).
* **Logs** are rate-limited per logger (:class:`LogBudget`): a flood of bad requests writes a few lines a second
  and a count of what was left out, never gigabytes.
* The process's soft limit on open files is raised to its hard limit at start, and the connection cap is kept
  below it, so accepting a connection never fails for want of a descriptor.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from phivision.args import ServeLimits

# Descriptors kept free below the open-file limit for everything that is not a connection: model files, the
# remote-image fetches, logs, Python's own.
RESERVED_FILES = 256
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: 40\r\n\r\ntoo many connections; try again shortly\n"
)
HEADER_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: 39\r\n\r\nrequest headers not received in time.\n"
)
# Connections beyond the cap kept for /healthz alone, and the seconds they get to send their request.
HEALTH_SLOTS = 32
PROBE_HEADER_TIMEOUT = 2.0
LOGGERS = ("uvicorn.error", "uvicorn.access", "uvicorn", "asyncio", "phivision.serve")


class GuardStats:
    """Counters a test or ``/healthz`` can read: connections refused over the cap, closed at the deadline."""

    refused = 0
    timed_out = 0


def guarded_protocol(max_connections: int, header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a deadline for request headers (see the module).

    At the cap, :data:`HEALTH_SLOTS` more connections are taken as health probes: they are answered only on
    ``/healthz`` (anything else gets 503) and must send their request within :data:`PROBE_HEADER_TIMEOUT`, so a
    load balancer still learns whether the model answers while a flood holds every ordinary slot."""
    probes = 0

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            nonlocal probes
            self._header_timer = None
            self._probe = len(self.connections) >= max_connections
            self._refused = self._probe and probes >= HEALTH_SLOTS
            if self._refused:
                GuardStats.refused += 1
                transport.write(REFUSED)
                transport.close()
                return
            super().connection_made(transport)
            if self._probe:
                probes += 1
                self.app = _health_only(self.app)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            nonlocal probes
            if self._refused:
                return
            probes -= self._probe
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._got_bytes = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._idle():
                self._arm()

        def _idle(self) -> bool:
            """No request between its headers and its response (reading headers, or kept alive)."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle, self._got_bytes = self.cycle, False
            seconds = min(header_timeout, PROBE_HEADER_TIMEOUT) if self._probe else header_timeout
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.cycle is not self._armed_cycle or not self._idle():
                return  # a request's headers arrived in time
            GuardStats.timed_out += 1
            if self._got_bytes:
                self.transport.write(HEADER_TIMEOUT)
            self.transport.close()

    return GuardedProtocol


def _health_only(app: Any) -> Any:
    """An ASGI app that passes ``/healthz`` to ``app`` and answers anything else 503 (a connection over the cap)."""

    async def health_only(scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") == "/healthz":
            await app(scope, receive, send)
            return
        body = b"too many connections; try again shortly\n"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return health_only


def open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit (as servers do) and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(wanted: int) -> int:
    """``wanted``, lowered to leave :data:`RESERVED_FILES` descriptors free below the open-file limit."""
    return max(1, min(wanted, open_file_limit() - RESERVED_FILES))


class LogBudget(logging.Filter):
    """At most ``per_second`` records a second on average (bursts of ``burst``) from each logger it filters; the
    rest are dropped and counted, and the next record let through says how many were left out."""

    def __init__(self, per_second: float = 5.0, burst: int = 50) -> None:
        super().__init__()
        self.per_second, self.burst = per_second, burst
        self.tokens: dict[str, float] = {}
        self.stamp: dict[str, float] = {}
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name, now = record.name, time.monotonic()
        tokens = self.tokens.get(name, float(self.burst))
        tokens = min(float(self.burst), tokens + (now - self.stamp.get(name, now)) * self.per_second)
        self.stamp[name] = now
        if tokens < 1.0:
            self.tokens[name] = tokens
            self.dropped[name] = self.dropped.get(name, 0) + 1
            return False
        self.tokens[name] = tokens - 1.0
        dropped = self.dropped.pop(name, 0)
        if dropped:
            record.msg = f"[{dropped} log line(s) left out: too many] {record.msg}"
        return True


def limit_logs(per_second: float = 5.0, burst: int = 50) -> LogBudget:
    """Put one :class:`LogBudget` on every logger a serving process writes through (idempotent)."""
    budget = LogBudget(per_second, burst)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, LogBudget)]:
            logger.removeFilter(old)
        logger.addFilter(budget)
    return budget


def server_config(app: Any, host: str, port: int, limits: ServeLimits, log_level: str = "info") -> Any:
    """The uvicorn configuration ``phivision serve`` runs with: h11 with ``limits.max_connections`` and the
    ``limits.header_timeout`` deadline, kept-alive connections closed after ``limits.keep_alive_timeout``, no
    WebSocket upgrades, logs within their budget."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(connection_cap(limits.max_connections), limits.header_timeout),
        ws="none",
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  (scheduled as a float)
    )
    limit_logs()  # after uvicorn.Config, which configures its loggers
    return config
