"""The HTTP server over real sockets on loopback (uvicorn in a thread), plus the micro-batcher on its own."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_helpers import ServerThread, png_bytes

from phivision.runs import load_model
from phivision.serve.server import MicroBatcher, QueueFull, ServeLimits, create_app

LIMITS = ServeLimits(max_batch_size=4, max_upload_mb=0.25, max_pixels=1_000_000, max_new_tokens=8)


@pytest.fixture(scope="module")
def server(lora_run: Path) -> Iterator[ServerThread]:
    with ServerThread(create_app(load_model(lora_run, device="cpu"), LIMITS)) as running:
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
    assert set(body) == {"image", "title", "category", "price", "answer"}
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


def test_healthz_and_openapi(server: ServerThread) -> None:
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and health["max_batch_size"] == LIMITS.max_batch_size
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/predict" in schema["paths"]
    operation = schema["paths"]["/v1/predict"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"200", "413", "415"} <= set(operation["responses"])
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no external assets


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


def run_batcher(generate, count: int, max_batch_size: int, max_queue: int = 64) -> tuple[list, MicroBatcher]:
    """Submit ``count`` images at once to a started batcher; return the answers (or exceptions) in order."""
    batcher = MicroBatcher(generate, max_batch_size=max_batch_size, max_wait_s=0.001, max_queue=max_queue)

    async def main() -> list:
        batcher.start()
        try:
            images = [Image.new("RGB", (10 + i, 10)) for i in range(count)]
            return await asyncio.gather(*(batcher.submit(image) for image in images), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main()), batcher


def answer_widths(images: list[Image.Image]) -> list[str]:
    return [f"width {image.width}" for image in images]


def test_batcher_groups_queued_requests() -> None:
    answers, batcher = run_batcher(answer_widths, count=5, max_batch_size=8)
    assert answers == [f"width {10 + i}" for i in range(5)]
    assert batcher.batch_sizes == [5]  # all five were queued before the worker ran: one batch

    answers, batcher = run_batcher(answer_widths, count=5, max_batch_size=2)
    assert answers == [f"width {10 + i}" for i in range(5)]
    assert batcher.batch_sizes == [2, 2, 1]


def test_batcher_survives_a_failing_batch() -> None:
    calls = []

    def flaky(images: list[Image.Image]) -> list[str]:
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return answer_widths(images)

    answers, batcher = run_batcher(flaky, count=3, max_batch_size=2)
    assert [type(a) for a in answers[:2]] == [RuntimeError, RuntimeError]
    assert answers[2] == "width 12"  # the next batch is answered normally
    assert batcher.batch_sizes == [2, 1]


def test_batcher_refuses_when_queue_is_full() -> None:
    answers, _ = run_batcher(answer_widths, count=3, max_batch_size=1, max_queue=1)
    assert answers[0] == "width 10"
    assert [type(a) for a in answers[1:]] == [QueueFull, QueueFull]
