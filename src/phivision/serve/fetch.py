"""Fetching an http(s) ``image_url`` for the chat API, only when the server was started to allow it.

A URL from a client is a request the server makes on the client's behalf, so it must not reach what the client
could not: cloud metadata services, link-local addresses and (unless allowed) the server's own loopback and
private networks. Every connection, the first and each redirect's, is opened by
:class:`phivision.netguard.GuardedAsyncBackend`, which resolves the host with
:func:`phivision.netguard.resolve_checked` and connects to the checked address itself (a name that resolves to a
good address for the check and a bad one for the connection cannot slip through). No proxy from the environment
is used. The whole fetch, redirects included, has one deadline and one size bound; a malformed URL (or redirect)
is a ``bad_url`` (``bad_redirect``) :class:`FetchError`, answered 400.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from urllib.parse import urljoin, urlsplit

import httpcore

from phivision.netguard import AddressPolicy, GuardedAsyncBackend

REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = b"phivision-serve (image_url fetch)"


class FetchError(Exception):
    """The image could not be fetched; ``reason`` is a short key (``timeout``, ``http_404``, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class FetchTooLarge(FetchError):
    """The image is larger than the upload bound."""


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One context for every fetch: loading the CA certificates takes tens of milliseconds, on the event loop."""
    return ssl.create_default_context()


def _checked_url(url: str) -> str:
    """``url`` if it is a well-formed http(s) URL with a host, else :class:`FetchError` (``bad_url``)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number from 0 to 65535)
        httpcore.URL(url)  # what the client itself would refuse (control characters, a broken authority)
    except (ValueError, TypeError, UnicodeError) as err:
        raise FetchError("bad_url", f"not a valid URL ({err})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("bad_url", f"not an http(s) URL with a host: {url[:200]!r}")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url) or not url.isascii():
        raise FetchError(
            "bad_url", "the URL holds spaces, control or non-ASCII characters (percent-encode them)"
        )
    return url


async def fetch_image(
    url: str, policy: AddressPolicy, max_bytes: int, timeout: float, max_redirects: int = 5
) -> bytes:
    """The body of ``url`` (http or https), following up to ``max_redirects`` redirects, each checked again.

    Asynchronous: a fetch waits on the network without holding a thread, so stalled image hosts never delay
    other requests (the caller bounds how many run at once). Raises
    :class:`phivision.netguard.BlockedAddress` for a refused address, :class:`FetchTooLarge` over
    ``max_bytes``, and :class:`FetchError` for anything else (timeout, HTTP error, bad URL or redirect).
    """
    try:
        return await asyncio.wait_for(_fetch(url, policy, max_bytes, max_redirects), timeout)
    except asyncio.TimeoutError:
        raise FetchError("timeout", f"no image within {timeout:g} s") from None


async def _fetch(url: str, policy: AddressPolicy, max_bytes: int, max_redirects: int) -> bytes:
    backend = GuardedAsyncBackend(policy)
    async with httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(), network_backend=backend, retries=0, max_connections=4
    ) as pool:
        for _ in range(max_redirects + 1):
            headers = [(b"Accept", b"image/*"), (b"User-Agent", USER_AGENT)]
            try:
                async with pool.stream("GET", _checked_url(url), headers=headers) as response:
                    if response.status in REDIRECTS:
                        location = _header(response, b"location")
                        if not location:
                            raise FetchError("bad_redirect", f"HTTP {response.status} without a Location")
                        try:
                            url = urljoin(url, location)
                        except ValueError as err:
                            raise FetchError(
                                "bad_redirect", f"a Location that is not a URL ({err})"
                            ) from None
                        continue
                    if response.status != 200:
                        raise FetchError(
                            f"http_{response.status}", f"the image server answered {response.status}"
                        )
                    return await _read_body(response, max_bytes)
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as err:
                raise FetchError("connection_error", f"{type(err).__name__}: {err}") from None
            except (ValueError, UnicodeError) as err:  # a URL httpcore cannot use after all
                raise FetchError("bad_url", f"not a usable URL ({err})") from None
        raise FetchError("too_many_redirects", f"more than {max_redirects} redirects")


async def _read_body(response: httpcore.Response, max_bytes: int) -> bytes:
    declared = _header(response, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise FetchTooLarge("too_large", f"the image is {int(declared):,} bytes; the limit is {max_bytes:,}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_stream():
        size += len(chunk)
        if size > max_bytes:
            raise FetchTooLarge("too_large", f"the image is over the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
