"""`phivision serve`: an HTTP API and a small upload page around one loaded model.

Requests never touch the model directly. Each upload is checked (size, then image decoding with a pixel bound)
on the request's own task, then queued; one background task gathers up to ``max_batch_size`` queued images
within ``max_wait_ms`` and answers them with a single batched ``generate_answers`` call on one dedicated
thread. So concurrent requests share GPU batches, the model is only ever used from one thread, and the event
loop stays free to accept uploads and answer ``/healthz`` while a batch runs.

Status codes: 413 for a request body over ``max_upload_mb`` (checked from Content-Length and again while the
body streams in) and for images over ``max_pixels`` (decompression bombs: refused from the header before any
decoding); 415 for files that are not decodable images; 503 when the queue is full; 504 when an answer takes
longer than ``request_timeout_s``; 500 if generation itself fails (the server keeps running).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from PIL import Image
from pydantic import BaseModel

from phivision.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from phivision.serve.predict import prediction_record

log = logging.getLogger("phivision.serve")

MB = 1024 * 1024
# Multipart framing (boundaries, part headers) around the file itself: allowed on top of the upload bound.
MULTIPART_OVERHEAD = 16 * 1024


class Prediction(BaseModel):
    """One answer: the fields parsed from the model's text (null when missing) and the text itself."""

    image: str | None
    title: str | None
    category: str | None
    price: float | None
    answer: str


class Health(BaseModel):
    status: str
    model: str
    queued: int
    requests: int
    batches: int
    max_batch_size: int


@dataclass
class ServeLimits:
    """The bounds one server enforces; the defaults suit product photos."""

    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_upload_mb: float = 10.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_queue: int = 256
    request_timeout_s: float = 300.0
    max_new_tokens: int = 64

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * MB) + MULTIPART_OVERHEAD


class QueueFull(Exception):
    """More requests are waiting than the server accepts (answered with 503)."""


class MicroBatcher:
    """Queue of (image, future); one task drains it in batches and runs ``generate`` on one model thread."""

    def __init__(
        self,
        generate: Callable[[list[Image.Image]], list[str]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
    ) -> None:
        self.generate = generate
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.requests = 0
        self.batches = 0
        self.batch_sizes: list[int] = []
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Create the queue and start the worker on the running event loop."""
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phivision-model")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, image: Image.Image) -> str:
        """Queue one image and wait for its answer."""
        assert self._queue is not None, "MicroBatcher.start() was not called"
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((image, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        self.requests += 1
        return await future

    async def _next_batch(self) -> list[tuple[Image.Image, asyncio.Future]]:
        """Wait for one request, then take whatever else arrives within max_wait_s, up to max_batch_size."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(image, future) for image, future in batch if not future.done()]  # drop disconnected clients

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batches += 1
            self.batch_sizes.append(len(batch))
            try:
                answers = await loop.run_in_executor(
                    self._executor, self.generate, [image for image, _ in batch]
                )
                if len(answers) != len(batch):
                    raise RuntimeError(f"generate returned {len(answers)} answers for {len(batch)} images")
            except Exception as err:  # a failed batch fails its requests, never the server
                log.exception("generation failed for a batch of %d", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


class UploadLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` on ``paths`` with 413.

    Content-Length is checked before anything is read; the body is also counted while it streams in, so a
    chunked or lying client is cut off at the bound instead of filling memory or disk.
    """

    def __init__(self, app: Any, max_bytes: int, paths: tuple[str, ...]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_json(send, 413, {"detail": self._message()})
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"upload too large: the limit is {(self.max_bytes - MULTIPART_OVERHEAD) / MB:g} MB"


async def _send_json(send: Callable, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def render_page(limits: ServeLimits, source: str) -> str:
    """The upload page: one self-contained HTML file (inline CSS and JS, no external assets)."""
    template = resources.files("phivision.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return template.replace("{{max_upload_mb}}", f"{limits.max_upload_mb:g}").replace(
        "{{model}}", html.escape(source)
    )


def create_app(loaded: Any, limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app for one loaded model (a :class:`phivision.runs.LoadedModel`)."""
    from phivision.evaluate.generate import generate_answers

    limits = limits or ServeLimits()
    if limits.max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {limits.max_batch_size}")

    def generate(images: list[Image.Image]) -> list[str]:
        return generate_answers(
            loaded.model,
            loaded.processor,
            images,
            prompt=loaded.prompt,
            batch_size=len(images),
            max_new_tokens=limits.max_new_tokens,
            progress=False,
        )

    batcher = MicroBatcher(generate, limits.max_batch_size, limits.max_wait_ms / 1000, limits.max_queue)
    page = render_page(limits, loaded.source)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="phivision",
        summary="Read a product photo and answer with its name, category and price.",
        version="1",
        lifespan=lifespan,
    )
    app.add_middleware(UploadLimit, max_bytes=limits.max_body_bytes, paths=("/v1/predict",))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(
            status="ok",
            model=loaded.source,
            queued=batcher.queued,
            requests=batcher.requests,
            batches=batcher.batches,
            max_batch_size=limits.max_batch_size,
        )

    @app.post(
        "/v1/predict",
        response_model=Prediction,
        responses={
            413: {"description": "Upload or image dimensions over the server's bounds"},
            415: {"description": "Not a decodable image"},
            503: {"description": "Too many requests queued"},
            504: {"description": "No answer within the request timeout"},
        },
    )
    async def predict(
        image: UploadFile = File(..., description="A product photo (JPEG, PNG, WebP, ...)."),
    ) -> dict:
        """Answer with the product's name, category and price for one uploaded photo."""
        data = await image.read()
        try:
            picture = await run_in_threadpool(load_image, data, limits.max_pixels)
        except ImageError as err:
            # The reason code only: the loader's detail names server-side objects, not the client's file.
            name = image.filename or "upload"
            if err.reason == "too_many_pixels":
                detail = f"{name}: too_many_pixels (the limit is {limits.max_pixels:,} pixels)"
                raise HTTPException(status_code=413, detail=detail) from None
            raise HTTPException(status_code=415, detail=f"{name}: {err.reason}") from None
        try:
            answer = await asyncio.wait_for(batcher.submit(picture), limits.request_timeout_s)
        except QueueFull:
            raise HTTPException(status_code=503, detail="server busy: too many requests queued") from None
        except asyncio.TimeoutError:
            raise HTTPException(status_code=504, detail="no answer within the request timeout") from None
        except Exception as err:
            raise HTTPException(status_code=500, detail=f"generation failed: {type(err).__name__}") from None
        return prediction_record(image.filename or "upload", answer)

    return app


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Load ``model`` (RUN, checkpoint or hub id) and serve it with uvicorn until interrupted."""
    import uvicorn

    from phivision.runs import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    uvicorn.run(create_app(loaded, limits), host=host, port=port, log_level="info")
