"""The HTTP server over real sockets on loopback (uvicorn in a thread), plus the micro-batcher on its own."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServerThread, png_bytes

from phivision.runs import LoadedModel, load_model
from phivision.serve.core import MicroBatcher, QueueFull, WorkerStopped
from phivision.serve.limits import allowed_hosts
from phivision.serve.server import ServeLimits, create_app

LIMITS = ServeLimits(max_batch_size=4, max_upload_mb=0.25, max_pixels=1_000_000, max_new_tokens=8)


@pytest.fixture(scope="module")
def loaded(lora_run: Path) -> LoadedModel:
    return load_model(lora_run, device="cpu")


@pytest.fixture(scope="module")
def server(loaded: LoadedModel) -> Iterator[ServerThread]:
    with ServerThread(create_app(loaded, LIMITS, hosts=allowed_hosts("127.0.0.1"))) as running:
        yield running


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring 10 gigapixels, with a few bytes of data: decoding it would exhaust memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def post(url: str, content: bytes, name: str = "photo.png", mime: str = "image/png") -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", files={"image": (name, content, mime)}, timeout=120)


def test_predict_returns_fields(server: ServerThread) -> None:
    response = post(server.url, png_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"image", "title", "category", "price", "currency", "answer"}
    assert body["image"] == "photo.png"
    assert isinstance(body["answer"], str)
    # Greedy decoding: the same photo gets the same answer.
    assert post(server.url, png_bytes()).json() == body


def test_oversized_upload_is_413(server: ServerThread) -> None:
    big = png_bytes() + b"\0" * (400 * 1024)  # over the 0.25 MB bound, announced by Content-Length
    response = post(server.url, big)
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]


def test_oversized_chunked_upload_is_cut_off_with_413(server: ServerThread) -> None:
    """No Content-Length (chunked): the bound is enforced while the body streams in."""
    boundary = "phivisionboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(40):  # 40 x 16 KiB = 640 KiB
            yield b"\0" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{server.url}/v1/predict",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert response.status_code == 413


def test_non_image_is_415(server: ServerThread) -> None:
    response = post(server.url, b"name,price\nbag,1290\n", name="catalog.csv", mime="text/plain")
    assert response.status_code == 415
    assert "not_an_image" in response.json()["detail"]


def test_decompression_bomb_is_413(server: ServerThread) -> None:
    response = post(server.url, bomb_png(), name="bomb.png")
    assert response.status_code == 413
    assert "too_many_pixels" in response.json()["detail"]
    # A real image over the server's pixel bound (1 MP) is refused the same way.
    assert post(server.url, png_bytes(size=(1200, 1000))).status_code == 413


def test_healthz_openapi_and_offline_docs(server: ServerThread) -> None:
    health = httpx.get(f"{server.url}/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["max_batch_size"] == LIMITS.max_batch_size
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/predict", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    operation = schema["paths"]["/v1/predict"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"200", "408", "413", "415"} <= set(operation["responses"])
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no external assets
    # /docs works offline: a self-contained page (FastAPI's own loads Swagger UI from a CDN); no /redoc.
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "/v1/chat/completions" in docs.text and "/v1/predict" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text and "<script" not in docs.text
    assert httpx.get(f"{server.url}/redoc").status_code == 404


def test_foreign_host_header_is_refused_on_loopback(server: ServerThread) -> None:
    """DNS rebinding: a web page's script reaches 127.0.0.1 through the attacker's name, which it carries in Host."""
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example"):
        response = httpx.get(f"{server.url}/healthz", headers={"Host": host})
        assert response.status_code == 400, host
        assert "evil.example" in response.json()["detail"]
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={}, headers={"Host": host})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_host"
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        assert httpx.get(f"{server.url}/healthz", headers={"Host": host}).status_code == 200, host


def test_slow_request_body_gets_408(loaded: LoadedModel) -> None:
    """A client that announces a body and trickles it (or never sends it) is cut off after --body-timeout."""
    limits = ServeLimits(max_new_tokens=4, body_timeout=1.0)
    with (
        ServerThread(create_app(loaded, limits)) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 5000\r\n\r\n{"model": '
        )
        sock.settimeout(20)
        started = time.monotonic()
        reply = b""
        while chunk := sock.recv(4096):  # the server closes the connection after a 408
            reply += chunk
        waited = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert waited < 15  # answered after the bound, not when the client gives up


def test_big_images_are_decoded_one_batch_at_a_time_within_the_pixel_budget(loaded: LoadedModel) -> None:
    """Uploads wait as bytes; the model thread decodes a batch whose pixels fit --max-batch-pixels."""
    limits = ServeLimits(
        max_batch_size=8, max_wait_ms=500, max_pixels=2_000_000, max_batch_pixels=1_500_000, max_new_tokens=2
    )
    images = [png_bytes(size=(1000, 1000), color=(40 * i, 90, 160)) for i in range(3)]  # 1 MP each
    with ServerThread(create_app(loaded, limits)) as server:
        with ThreadPoolExecutor(max_workers=3) as pool:
            responses = list(pool.map(lambda data: post(server.url, data), images))
        health = httpx.get(f"{server.url}/healthz").json()
    assert [r.status_code for r in responses] == [200] * 3
    assert health["batches"] == 3  # two 1 MP images never share a 1.5 MP batch, though they arrived together


def test_broken_model_is_reported_by_healthz(lora_run: Path) -> None:
    """A model that cannot generate (here: weights on the meta device, i.e. gone) turns /healthz to 503."""
    broken = load_model(lora_run, device="cpu")
    broken.model.to("meta")
    with ServerThread(create_app(broken, ServeLimits(max_new_tokens=4))) as server:
        assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"  # nothing has failed yet
        response = post(server.url, png_bytes())
        assert response.status_code == 500 and "generation failed" in response.json()["detail"]
        health = httpx.get(f"{server.url}/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "error" and health.json()["failed_batches"] == 1
    assert health.json()["error"]


def test_concurrent_requests_all_succeed(server: ServerThread) -> None:
    before = httpx.get(f"{server.url}/healthz").json()
    images = [png_bytes(color=(30 * i, 200 - 20 * i, 90)) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda data: post(server.url, data), images))
    assert [r.status_code for r in responses] == [200] * 8
    # Each answer is the one for its own image (batching must not shuffle answers between requests).
    for data, response in zip(images, responses, strict=True):
        assert post(server.url, data).json()["answer"] == response.json()["answer"]
    after = httpx.get(f"{server.url}/healthz").json()
    assert after["status"] == "ok"
    assert after["requests"] == before["requests"] + 16
    assert after["batches"] - before["batches"] <= 16


# --------------------------------------------------------------------------------------------- batcher


def run_batcher(
    process, count: int, max_batch_size: int, max_queue: int = 64, costs=None, max_batch_cost=None
) -> tuple[list, MicroBatcher]:
    """Submit ``count`` items at once to a started batcher; return the results (or exceptions) in order."""
    batcher = MicroBatcher(
        process,
        max_batch_size=max_batch_size,
        max_wait_s=0.001,
        max_queue=max_queue,
        max_batch_cost=max_batch_cost,
    )
    costs = costs or [1] * count

    async def main() -> list:
        batcher.start()
        try:
            calls = (batcher.submit(10 + i, cost=costs[i]) for i in range(count))
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main()), batcher


def answer_widths(items: list[int]) -> list[str]:
    return [f"width {item}" for item in items]


def test_batcher_groups_queued_requests() -> None:
    answers, batcher = run_batcher(answer_widths, count=5, max_batch_size=8)
    assert answers == [f"width {10 + i}" for i in range(5)]
    assert batcher.batch_sizes == [5]  # all five were queued before the worker ran: one batch

    answers, batcher = run_batcher(answer_widths, count=5, max_batch_size=2)
    assert answers == [f"width {10 + i}" for i in range(5)]
    assert batcher.batch_sizes == [2, 2, 1]


def test_batcher_keeps_each_batch_within_its_pixel_budget() -> None:
    # Costs are decoded pixels: a batch takes items while they fit, the first always; the rest wait their turn.
    costs = [6, 3, 5, 9, 1, 1]
    answers, batcher = run_batcher(answer_widths, count=6, max_batch_size=8, costs=costs, max_batch_cost=10)
    assert answers == [f"width {10 + i}" for i in range(6)]
    assert batcher.batch_sizes == [2, 1, 2, 1]  # 6+3 | 5 (+9 would pass 10) | 9+1 | 1


def test_batcher_survives_a_failing_batch() -> None:
    calls = []

    def flaky(items: list[int]) -> list[str]:
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return answer_widths(items)

    batcher = MicroBatcher(flaky, max_batch_size=2, max_wait_s=0.001, max_queue=8)

    async def main() -> tuple[list, str | None, list, str | None]:
        batcher.start()
        try:
            first = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
            error_after_failure = batcher.last_error
            second = await asyncio.gather(batcher.submit(3), return_exceptions=True)
            return first, error_after_failure, second, batcher.last_error
        finally:
            await batcher.stop()

    first, error_after_failure, second, error_after_success = asyncio.run(main())
    assert [type(a) for a in first] == [RuntimeError, RuntimeError]
    assert error_after_failure == "RuntimeError: out of memory"  # /healthz reports it...
    assert second == ["width 3"]  # ...the next batch is answered normally...
    assert error_after_success is None  # ...and the report clears
    assert batcher.failed_batches == 1


def test_batcher_fails_every_request_when_its_worker_dies() -> None:
    class Fatal(BaseException):
        """Not an Exception: escapes the per-batch handler, as a bug in the worker would."""

    def dies(items: list[int]) -> list[str]:
        raise Fatal("worker bug")

    batcher = MicroBatcher(dies, max_batch_size=1, max_wait_s=0.001, max_queue=8)

    async def main() -> tuple[list, bool, str | None, type]:
        batcher.start()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True), 10
            )
            try:
                await batcher.submit(99)
                late = None
            except WorkerStopped as err:
                late = type(err)
            return results, batcher.alive, batcher.worker_error, late
        finally:
            await batcher.stop()

    results, alive, error, late = asyncio.run(main())
    assert [type(r) for r in results] == [WorkerStopped] * 3  # nobody waits for an answer that cannot come
    assert not alive and error == "Fatal: worker bug"
    assert late is WorkerStopped


def test_batcher_refuses_when_queue_is_full() -> None:
    answers, _ = run_batcher(answer_widths, count=3, max_batch_size=1, max_queue=1)
    assert answers[0] == "width 10"
    assert [type(a) for a in answers[1:]] == [QueueFull, QueueFull]


def test_batcher_refuses_when_queued_bytes_are_over_budget() -> None:
    batcher = MicroBatcher(
        answer_widths, max_batch_size=1, max_wait_s=0.001, max_queue=8, max_queue_bytes=100
    )

    async def main() -> list:
        batcher.start()
        try:
            calls = [batcher.submit(i, nbytes=60) for i in range(3)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results[0] == "width 0"
    assert [type(r) for r in results[1:]] == [QueueFull, QueueFull]  # 60 + 60 bytes would pass 100
    assert batcher.queued_bytes == 0
