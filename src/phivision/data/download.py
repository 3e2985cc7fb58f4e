"""Concurrent, resumable, validated image downloads that never abort the run and never hang.

Each unique URL is fetched once, with a global and a per-host concurrency limit. Connection errors, timeouts,
5xx and 429 are retried with exponential backoff and jitter (429 and 503 honour ``Retry-After``, capped); other
4xx fail at once. Every attempt has a deadline (``download_timeout``) besides the per-read timeout, so a host
that drips one byte a second cannot hold the run. Connections go only to addresses the
:mod:`phivision.netguard` policy allows, checked after DNS resolution and again on every redirect (link-local
and cloud-metadata addresses never). Whatever goes wrong with one URL (any exception) fails that URL with a
reason; only a failure to write to the local disk stops the run.

An image counts only after :func:`check_image` decoded it (the checks of :func:`load_image`, JPEGs decoded at
1/8 scale); it is then written atomically, so a rerun (even after SIGKILL) trusts what is on disk, re-validates
it, and fetches only what is missing. Local files (``--allow-local``) must be regular files no larger than
``max_bytes``: no devices, no FIFOs.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import hashlib
import itertools
import os
import random
import re
import ssl
import stat
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import certifi
import httpx
from tqdm.auto import tqdm

from phivision.args import Download
from phivision.data.images import ImageError, check_image
from phivision.io import WriteError, atomic_write_bytes
from phivision.netguard import BlockedAddress, guarded_async_transport

_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")  # a host name after IDNA encoding, or an IP address
USER_AGENT = "phivision-prepare/0.1 (+https://github.com/phivision)"
# file signatures of the formats product photos come in; anything else Pillow decodes is saved as ".img"
SIGNATURES = [
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
]


@dataclass
class Fetched:
    """What happened to one URL: ``status`` is ``downloaded``, ``reused`` (valid file already on disk) or
    ``failed`` with a short ``reason`` such as ``http_404``, ``timeout``, ``not_an_image``."""

    url: str
    status: str
    file: str | None = None  # name inside the images directory
    reason: str | None = None
    detail: str = ""
    attempts: int = 0


@dataclass
class DownloadStats:
    requests: int = 0
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)


class _Failure(Exception):
    def __init__(
        self, reason: str, detail: str = "", retryable: bool = False, wait: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason, self.detail, self.retryable, self.wait = reason, detail, retryable, wait


def extension_of(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in SIGNATURES if data.startswith(magic)), ".img")


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def file_stem(product_code: str, url: str) -> str:
    """A file name that cannot escape ``images/``: the product code reduced to ``[A-Za-z0-9._-]`` (no leading
    dots), at most 60 characters, then the URL's hash, which alone identifies the file on a rerun."""
    code = re.sub(r"[^A-Za-z0-9._-]+", "_", str(product_code)).lstrip("._-")[:60] or "image"
    return f"{code}-{url_hash(url)}"


def url_kind(url: object, allow_local: bool) -> str | None:
    """``"http"`` or ``"local"`` when ``url`` can be fetched, else None. Never raises."""
    if url_problem(url, allow_local) is not None:
        return None
    return "http" if _is_http(str(url)) else "local"


def _is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def url_problem(url: object, allow_local: bool) -> str | None:
    """Why ``url`` cannot be fetched, as a report key (``missing_image_url``, ``unsupported_url``,
    ``malformed_url``), or None. Never raises: a malformed URL is one dropped row, not an aborted run."""
    if not isinstance(url, str) or not url.strip():
        return "missing_image_url"
    try:
        url.encode("utf-8")  # a lone surrogate (from a JSON escape) cannot be requested or written
        parts = urlsplit(url)
    except (ValueError, UnicodeError):
        return "malformed_url"
    if parts.scheme.lower() in ("http", "https"):
        try:
            parsed = httpx.URL(url)
        except Exception:  # httpx.InvalidURL, or an IDNA error for a bad non-ASCII host name
            return "malformed_url"
        host = parsed.raw_host.decode("ascii", "replace")  # IDNA-encoded, so ASCII for a valid name
        return None if _HOST.fullmatch(host) else "malformed_url"  # no spaces, no %-escapes
    if allow_local and (
        parts.scheme.lower() == "file" or (parts.scheme == "" and url.startswith(("/", "./", "../")))
    ):
        return None
    return "unsupported_url"


def existing_files(images_dir: Path) -> dict[str, str]:
    """Map URL hash -> file name for the images already on disk, and remove temporary files a killed run left."""
    found: dict[str, str] = {}
    if not images_dir.is_dir():
        return found
    for entry in images_dir.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
            continue
        stem = entry.name.rsplit(".", 1)[0]
        found[stem.rsplit("-", 1)[-1]] = entry.name
    return found


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return ""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Downloader:
    """Fetch ``{url: stem}`` into ``images_dir``. One instance per run; see :func:`download_images`."""

    def __init__(self, images_dir: Path, config: Download, on_done: Callable[[Fetched], None] | None = None):
        self.images_dir = images_dir
        self.config = config
        self.on_done = on_done
        self.stats = DownloadStats()
        self._hosts: dict[str, asyncio.Semaphore] = {}

    async def run(self, jobs: dict[str, str]) -> dict[str, Fetched]:
        """``concurrency`` workers, each with its own small HTTP client, take URLs from one list.

        One shared client with a large pool would be simpler, but httpx's pool rescans every connection on
        each request, which made 64 concurrent requests slower than 16 on two cores; small per-worker pools
        keep that cost constant.
        """
        by_host: dict[str, list[tuple[str, str]]] = {}
        for url, stem in jobs.items():
            by_host.setdefault(_host_of(url), []).append((url, stem))
        # hosts take turns, so workers waiting for one busy host do not starve the others
        order = [job for turn in itertools.zip_longest(*by_host.values()) for job in turn if job is not None]
        pending = order[::-1]
        results: dict[str, Fetched] = {}
        ssl_context = ssl.create_default_context(cafile=certifi.where())  # built once, shared by all workers

        async def worker() -> None:
            async with self._client(ssl_context) as client:
                while pending:
                    url, stem = pending.pop()
                    results[url] = await self._one(client, url, stem)

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(worker()) for _ in range(min(self.config.concurrency, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # a disk that cannot be written: stop every worker before reporting it
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.stats.seconds = time.perf_counter() - start
        return results

    def _client(self, ssl_context: ssl.SSLContext) -> httpx.AsyncClient:
        cfg = self.config
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        return httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
            headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"},
            follow_redirects=True,
            transport=guarded_async_transport(cfg.policy, verify=ssl_context, limits=limits),
        )

    async def _one(self, client: httpx.AsyncClient, url: str, stem: str) -> Fetched:
        """Fetch, check and save one URL. Any failure becomes a failed :class:`Fetched` with a reason, except a
        failure to write the local disk (:class:`WriteError`), which stops the run."""
        try:
            kind = url_kind(url, self.config.allow_local)
            if kind is None:
                raise _Failure(
                    url_problem(url, self.config.allow_local) or "unsupported_url",
                    "only http(s) URLs (use --allow-local for files)",
                )
            if kind == "local":
                data = await asyncio.to_thread(_read_local, url, self.config.max_bytes)
                attempts = 0
            else:
                data, attempts = await self._fetch(client, url)
            file = await asyncio.to_thread(self._validate_and_save, data, stem)
            result = Fetched(url, "downloaded", file=file, attempts=attempts)
        except _Failure as err:
            result = Fetched(url, "failed", reason=err.reason, detail=err.detail)
        except WriteError:
            raise
        except Exception as err:  # whatever else one URL can throw must not abort the other thousands
            result = Fetched(url, "failed", reason="error", detail=f"{type(err).__name__}: {err}"[:500])
        self.stats.outcomes[result.reason or result.status] += 1
        if self.on_done:
            self.on_done(result)
        return result

    async def _fetch(self, client: httpx.AsyncClient, url: str) -> tuple[bytes, int]:
        """GET with retries. Returns (body, attempts) or raises _Failure with the last attempt's reason."""
        cfg = self.config
        host = _host_of(url)
        host_limit = self._hosts.setdefault(host, asyncio.Semaphore(cfg.per_host))
        for attempt in range(cfg.retries + 1):
            wait = None
            async with host_limit:
                self.stats.requests += 1
                try:
                    return await self._get_before_deadline(client, url), attempt + 1
                except _Failure as err:
                    if not err.retryable or attempt == cfg.retries:
                        raise
                    wait = err.wait
            self.stats.retries += 1
            if wait is None:
                wait = cfg.backoff * 2**attempt * (0.5 + random.random())  # exponential, with jitter
            await asyncio.sleep(min(wait, cfg.max_wait))
        raise AssertionError("unreachable: the last attempt raises")

    async def _get_before_deadline(self, client: httpx.AsyncClient, url: str) -> bytes:
        """One attempt, ended after ``download_timeout`` seconds however steadily the bytes arrive."""
        try:
            return await asyncio.wait_for(self._get(client, url), self.config.download_timeout)
        except asyncio.TimeoutError:
            raise _Failure(
                "download_timeout", f"not finished after {self.config.download_timeout:g} s: {url}"
            ) from None

    async def _get(self, client: httpx.AsyncClient, url: str) -> bytes:
        try:
            async with client.stream("GET", url) as response:
                code = response.status_code
                if code != 200:
                    raise _Failure(
                        f"http_{code}",
                        f"HTTP {code} from {url}",
                        retryable=code == 429 or code >= 500,
                        wait=_retry_after(response) if code in (429, 503) else None,
                    )
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.config.max_bytes:
                        raise _Failure("too_large", f"more than {self.config.max_bytes} bytes")
                    chunks.append(chunk)
                self.stats.bytes += size
                return b"".join(chunks)
        except BlockedAddress as err:  # refused before any byte was sent (first request or a redirect)
            raise _Failure(err.reason, err.detail, retryable=err.reason == "dns_error") from None
        except httpx.TimeoutException as exc:
            raise _Failure("timeout", f"{type(exc).__name__} for {url}", retryable=True) from None
        except httpx.RemoteProtocolError as exc:  # e.g. the body ended before Content-Length
            raise _Failure("incomplete_response", str(exc), retryable=True) from None
        except httpx.TooManyRedirects as exc:
            raise _Failure("too_many_redirects", str(exc)) from None
        except httpx.UnsupportedProtocol as exc:  # a redirect to ftp:// or file://
            raise _Failure("unsupported_url", f"redirected to an unsupported URL: {exc}") from None
        except httpx.DecodingError as exc:  # a body that does not match its Content-Encoding
            raise _Failure("decoding_error", f"{url}: {exc}") from None
        except httpx.InvalidURL as exc:  # e.g. a redirect to a malformed Location
            raise _Failure("malformed_url", f"{url}: {exc}") from None
        except httpx.TransportError as exc:
            raise _Failure("connection_error", f"{type(exc).__name__}: {exc}", retryable=True) from None

    def _validate_and_save(self, data: bytes, stem: str) -> str:
        """Decode the image before it counts; keep the original bytes (EXIF and all) on disk."""
        try:
            check_image(data, max_pixels=self.config.max_pixels)
        except ImageError as err:
            raise _Failure(err.reason, err.detail) from None
        name = stem + extension_of(data)
        atomic_write_bytes(self.images_dir / name, data)
        return name


def _local_path(url: str) -> Path:
    return Path(unquote(urlsplit(url).path)) if url.lower().startswith("file:") else Path(url)


def _read_local(url: str, max_bytes: int) -> bytes:
    """A local image: a regular file (a symlink to one is fine) of at most ``max_bytes``. Devices, FIFOs and
    directories are refused before they are read, and the file is opened non-blocking, so nothing can hang."""
    path = _local_path(url)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _Failure("not_a_regular_file", f"{path}: not a regular file (a device, FIFO or directory)")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise _Failure("missing", str(path)) from None
    except OSError as err:
        raise _Failure("unreadable", f"{path}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced between the two looks
            raise _Failure("not_a_regular_file", f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise _Failure("too_large", f"{path}: {info.st_size} bytes, more than {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew while being read
            raise _Failure("too_large", f"{path}: more than {max_bytes} bytes")
        return data
    except OSError as err:
        raise _Failure("unreadable", f"{path}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def validate_existing(images_dir: Path, name: str, max_pixels: int | None) -> bool:
    """True when a file left by an earlier run still decodes; a bad one is deleted so it is fetched again."""
    try:
        check_image(images_dir / name, max_pixels=max_pixels)
        return True
    except ImageError:
        (images_dir / name).unlink(missing_ok=True)
        return False


def download_images(
    jobs: dict[str, str],
    images_dir: str | Path,
    config: Download | None = None,
    progress: bool = True,
) -> tuple[dict[str, Fetched], DownloadStats]:
    """Make sure every URL in ``jobs`` (url -> file stem from :func:`file_stem`) has a valid file in
    ``images_dir``: reuse the ones a previous run finished, download the rest concurrently.

    Returns one :class:`Fetched` per URL and the run's statistics.
    """
    config = config or Download()
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    on_disk = existing_files(images_dir)
    candidates = {url: on_disk[url_hash(url)] for url in jobs if url_hash(url) in on_disk}
    with ThreadPoolExecutor(max_workers=4) as pool:
        valid = pool.map(
            lambda name: validate_existing(images_dir, name, config.max_pixels), candidates.values()
        )
        results = {
            url: Fetched(url, "reused", file=name)
            for (url, name), ok in zip(candidates.items(), valid, strict=True)
            if ok
        }
    todo = {url: stem for url, stem in jobs.items() if url not in results}
    bar = tqdm(total=len(jobs), initial=len(results), desc="images", unit="img", disable=not progress)
    failed = Counter()

    def on_done(result: Fetched) -> None:
        if result.status == "failed":
            failed[result.reason] += 1
            bar.set_postfix(failed=sum(failed.values()), refresh=False)
        bar.update(1)

    downloader = Downloader(images_dir, config, on_done)
    try:
        with _old_objects_frozen():
            results.update(_run_async(downloader.run(todo)) if todo else {})
    finally:
        bar.close()
    downloader.stats.outcomes["reused"] += sum(1 for r in results.values() if r.status == "reused")
    return results, downloader.stats


@contextlib.contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """Keep the objects that exist before the download out of the garbage collector's full passes meanwhile.

    ``import phivision`` loads torch and transformers: some 400,000 objects, which one full collection walks
    in about 0.25 s on two cores, and the download allocates enough to trigger one. What the download frees is
    still collected; older garbage waits until after the download. Skipped when the caller froze already.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run_async(coro: Coroutine) -> dict:
    """``asyncio.run``, also from inside a running event loop (a notebook): then in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
