"""Fetching an http(s) ``image_url`` for the chat API, only when the server was started to allow it.

A URL from a client is a request the server makes on the client's behalf, so it must not reach what the client
could not: cloud metadata services, link-local addresses and (unless allowed) the server's own loopback and
private networks. Every connection, the first and each redirect's, is opened by :class:`GuardedBackend`, which
resolves the host with :func:`phivision.netguard.resolve_checked` and connects to the checked address itself (a
name that resolves to a good address for the check and a bad one for the connection cannot slip through). No
proxy from the environment is used. The whole fetch, redirects included, has one deadline and one size bound.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore

from phivision.netguard import AddressPolicy, resolve_checked

REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = b"phivision-serve (image_url fetch)"


class FetchError(Exception):
    """The image could not be fetched; ``reason`` is a short key (``timeout``, ``http_404``, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class FetchTooLarge(FetchError):
    """The image is larger than the upload bound."""


class GuardedBackend(httpcore.SyncBackend):
    """A network backend that only connects to addresses ``policy`` allows (checked at connect time)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last_error: Exception | None = None
        for address in resolve_checked(host, port, self.policy):  # raises BlockedAddress
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                last_error = err
        raise last_error or httpcore.ConnectError(f"{host}: no address to connect to")


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def fetch_image(
    url: str, policy: AddressPolicy, max_bytes: int, timeout: float, max_redirects: int = 5
) -> bytes:
    """The body of ``url`` (http or https), following up to ``max_redirects`` redirects, each checked again.

    Raises :class:`phivision.netguard.BlockedAddress` for a refused address, :class:`FetchTooLarge` over
    ``max_bytes``, and :class:`FetchError` for anything else (timeout, HTTP error, bad URL or redirect).
    """
    deadline = time.monotonic() + timeout
    backend = GuardedBackend(policy)
    with httpcore.ConnectionPool(
        ssl_context=ssl.create_default_context(), network_backend=backend, retries=0, max_connections=4
    ) as pool:
        for _ in range(max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchError("bad_url", f"not an http(s) URL: {url[:200]}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", f"no image within {timeout:g} s")
            limits = {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}
            headers = [(b"Accept", b"image/*"), (b"User-Agent", USER_AGENT)]
            try:
                with pool.stream("GET", url, headers=headers, extensions={"timeout": limits}) as response:
                    if response.status in REDIRECTS:
                        location = _header(response, b"location")
                        if not location:
                            raise FetchError("bad_redirect", f"HTTP {response.status} without a Location")
                        url = urljoin(url, location)
                        continue
                    if response.status != 200:
                        raise FetchError(
                            f"http_{response.status}", f"the image server answered {response.status}"
                        )
                    return _read_body(response, max_bytes, deadline, timeout)
            except httpcore.TimeoutException:
                raise FetchError("timeout", f"no image within {timeout:g} s") from None
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as err:
                raise FetchError("connection_error", f"{type(err).__name__}: {err}") from None
        raise FetchError("too_many_redirects", f"more than {max_redirects} redirects")


def _read_body(response: httpcore.Response, max_bytes: int, deadline: float, timeout: float) -> bytes:
    declared = _header(response, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise FetchTooLarge("too_large", f"the image is {int(declared):,} bytes; the limit is {max_bytes:,}")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_stream():
        size += len(chunk)
        if size > max_bytes:
            raise FetchTooLarge("too_large", f"the image is over the limit of {max_bytes:,} bytes")
        if time.monotonic() > deadline:  # a server that trickles bytes just fast enough for each read
            raise FetchError("timeout", f"no image within {timeout:g} s")
        chunks.append(chunk)
    return b"".join(chunks)
