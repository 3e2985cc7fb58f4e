"""The serving core under both route modules (:mod:`phivision.serve.server`, :mod:`phivision.serve.openai_api`):
the micro-batcher, what the routes share (:class:`Serving`), how a batch of queued requests is answered
(:func:`answer_jobs`) and the errors a request can end with.

Requests queue small work items (an upload's bytes, not decoded pixels); one task takes the first waiting item
plus whatever else arrives within ``max_wait_s``, up to ``max_batch_size`` items and ``max_batch_cost`` (decoded
pixels), and hands the batch to ``process`` on one dedicated thread. So concurrent requests share GPU batches, the
model is only ever used from that thread, memory held by waiting requests is their bytes, and the event loop stays
free to accept uploads and answer ``/healthz`` while a batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from PIL import Image
from starlette.concurrency import run_in_threadpool

from phivision.answer.calibration import PriceRange
from phivision.answer.constrain import AnswerConstraint
from phivision.answer.generate import generate_completions
from phivision.answer.prompt import PromptFormat, parse_answer
from phivision.answer.ranges import answer_range
from phivision.args import PRICE_LEVEL, ServeLimits
from phivision.data.images import ALLOWED_FORMATS, ImageError, image_size, load_image
from phivision.netguard import AddressPolicy

log = logging.getLogger("phivision.serve")


class QueueFull(Exception):
    """More requests (or more bytes) are waiting than the server accepts (answered with 503)."""


class WorkerStopped(Exception):
    """The batching task is not running, so nothing would ever answer (answered with 503)."""


@dataclass
class _Waiting:
    item: Any
    cost: int
    nbytes: int
    future: asyncio.Future


class MicroBatcher:
    """Queue of work items; one task drains it in batches and runs ``process`` on one model thread.

    ``process(items)`` returns one result per item, in order; a result that is an exception fails only its own
    request (e.g. an image that does not decode). If ``process`` raises, every request of the batch fails with
    that error and :attr:`last_error` says so until a later batch succeeds.
    """

    def __init__(
        self,
        process: Callable[[list[Any]], list[Any]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        max_batch_cost: int | None = None,
        max_queue_bytes: int | None = None,
    ) -> None:
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_batch_cost = max_batch_cost
        self.max_queue_bytes = max_queue_bytes
        self.requests = 0
        self.batches = 0
        self.failed_batches = 0
        self.batch_sizes: list[int] = []
        self.last_error: str | None = None  # why the latest batch failed; None once one succeeds
        self.queued_bytes = 0
        self._carry: _Waiting | None = None  # taken from the queue but over the last batch's cost: goes next
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued(self) -> int:
        waiting = self._queue.qsize() if self._queue is not None else 0
        return waiting + (self._carry is not None)

    @property
    def alive(self) -> bool:
        """The batching task is running (False before start, after stop, or if it died)."""
        return self._task is not None and not self._task.done()

    @property
    def worker_error(self) -> str | None:
        """Why the batching task ended, when it died of an error."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        err = self._task.exception()
        return f"{type(err).__name__}: {err}" if err is not None else "the worker stopped"

    def start(self) -> None:
        """Create the queue and start the worker on the running event loop."""
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phivision-model")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        elif self._task is not None:
            self.worker_error  # noqa: B018  (retrieves a dead worker's exception: it was logged already)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, item: Any, cost: int = 1, nbytes: int = 0) -> Any:
        """Queue one item (``cost``: its share of ``max_batch_cost``; ``nbytes``: memory it holds while it
        waits) and wait for its result."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if not self.alive:
            raise WorkerStopped(self.worker_error or "the worker is not running")
        if self.max_queue_bytes is not None and self.queued_bytes + nbytes > self.max_queue_bytes:
            raise QueueFull
        waiting = _Waiting(item, cost, nbytes, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(waiting)
        except asyncio.QueueFull:
            raise QueueFull from None
        self.requests += 1
        self.queued_bytes += nbytes
        return await waiting.future

    async def _take(self, timeout: float | None) -> _Waiting:
        """The carried-over item, else the next queued one (waiting at most ``timeout``; None: forever)."""
        assert self._queue is not None
        if self._carry is not None:
            waiting, self._carry = self._carry, None
        elif not self._queue.empty():
            waiting = self._queue.get_nowait()
        elif timeout is None:
            waiting = await self._queue.get()
        else:
            # Not wait_for(queue.get()): on Python < 3.12 it can drop an item that arrives as the timeout fires.
            getter = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({getter}, timeout=timeout)
            if not getter.done():
                getter.cancel()
                await asyncio.wait({getter})  # it may have taken an item just before the cancel
            if getter.cancelled():
                raise asyncio.TimeoutError
            waiting = getter.result()
        self.queued_bytes -= waiting.nbytes
        return waiting

    async def _next_batch(self) -> list[_Waiting]:
        """Wait for one request, then take whatever else arrives within max_wait_s, up to max_batch_size items
        and max_batch_cost; an item over the cost bound waits for the next batch."""
        loop = asyncio.get_running_loop()
        batch = [await self._take(None)]
        cost = batch[0].cost
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                waiting = await self._take(max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if self.max_batch_cost is not None and cost + waiting.cost > self.max_batch_cost:
                self.queued_bytes += waiting.nbytes
                self._carry = waiting
                break
            batch.append(waiting)
            cost += waiting.cost
        return [waiting for waiting in batch if not waiting.future.done()]  # drop abandoned requests

    async def _run(self) -> None:
        batch: list[_Waiting] = []
        try:
            while True:
                batch = await self._next_batch()
                if batch:
                    await self._answer(batch)
                batch = []
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # a bug or a fatal error in process: fail everyone rather than hang
            log.exception("the model worker stopped")
            stopped = WorkerStopped(f"{type(err).__name__}: {err}")
            for waiting in batch + self._drain():
                if not waiting.future.done():
                    waiting.future.set_exception(stopped)
            raise

    def _drain(self) -> list[_Waiting]:
        drained = [self._carry] if self._carry is not None else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            drained.append(self._queue.get_nowait())
        return drained

    async def _answer(self, batch: list[_Waiting]) -> None:
        self.batches += 1
        self.batch_sizes.append(len(batch))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.process, [w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
        except Exception as err:  # a failed batch fails its requests, never the server
            log.exception("generation failed for a batch of %d", len(batch))
            self.failed_batches += 1
            self.last_error = f"{type(err).__name__}: {err}"
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(err)
            return
        self.last_error = None
        for waiting, result in zip(batch, results, strict=True):
            if waiting.future.done():
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)


# ------------------------------------------------------------------------------------------ answering


@dataclass(frozen=True)
class Generation:
    """How to answer: requests with equal settings share one batched generate call."""

    question: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass
class Job:
    """One queued request: the bytes of the product's photos, in order (decoded on the model thread), how to
    answer, and an optional ``on_token(token_id)`` called on the model thread as tokens are generated
    (streaming)."""

    images: list[bytes]
    generation: Generation
    on_token: Callable[[int], None] | None = None


class PhotoError(Exception):
    """Photo number ``index`` (0-based) of a request cannot be used: ``error`` says why (the loader's reason)."""

    def __init__(self, index: int, error: ImageError) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


def decode_photos(images: list[bytes], max_pixels: int) -> list[Image.Image]:
    """Every photo of a request decoded, in order; the first that fails raises :class:`PhotoError`."""
    decoded = []
    for k, data in enumerate(images):
        try:
            decoded.append(load_image(data, max_pixels))
        except ImageError as err:
            raise PhotoError(k, err) from None
    return decoded


def image_pixels(data: bytes, max_pixels: int) -> int:
    """The image's pixel count from its header, without decoding it, checked by the one image loader (format
    allowlist, pixel bound). Raises :class:`ImageError`."""
    width, height = image_size(data, max_pixels)
    return width * height


class RequestFailed(Exception):
    """Generation failed for this request alone: its own inputs, since the rest of its batch was answered, or
    the model still answers a known-good request. It gets a 500; the server stays healthy."""

    def __init__(self, err: Exception) -> None:
        super().__init__(f"{type(err).__name__}: {err}")
        self.cause = err


class ModelCheck:
    """Whether the model still answers: one greedy token for a small known-good photo, asked when a batch
    failed as a whole, at most every ``every_s`` seconds (a flood of bad requests costs one check, not one
    each). A failure then belongs to the requests, and ``/healthz`` stays ok; only a model that fails the check
    turns it to 503."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.checked_at = -float("inf")
        self.ok = True

    def model_answers(self, loaded: Any) -> bool:
        now = time.monotonic()
        if now - self.checked_at < self.every_s:
            return self.ok
        photo = Image.new("RGB", (64, 48), (200, 40, 40))
        try:
            generate_completions(loaded.model, loaded.processor, [photo], loaded.prompt, 1, 1, progress=False)
            self.ok = True
        except Exception:  # noqa: BLE001  (whatever stops the model stops it for everyone)
            self.ok = False
        self.checked_at = time.monotonic()
        return self.ok


def answer_jobs(
    loaded: Any, limits: ServeLimits, jobs: list[Job], check: ModelCheck | None = None
) -> list[Any]:
    """Decode the batch's photos and answer them (on the model thread): one Completion or error (PhotoError,
    RequestFailed) per job; a job's photos go into one prompt, in order.

    Decoding happens here, one batch at a time, so decoded pixels exist only for the batch being answered.
    Jobs with different generation settings are answered by one generate call per setting. A call that fails
    is retried one request at a time, so a request whose own inputs fail generation gets its own
    :class:`RequestFailed` and the others are answered. Only when nothing in the batch could be answered and
    the model fails ``check`` too does this raise (the batch failed; ``/healthz`` reports it).
    """
    constraint = AnswerConstraint.for_model(loaded) if limits.constrain else None
    ranged = constraint is not None and loaded.calibration is not None
    results: list[Any] = [None] * len(jobs)
    images: dict[int, list[Image.Image]] = {}
    for i, job in enumerate(jobs):
        try:
            images[i] = decode_photos(job.images, limits.max_pixels)
        except PhotoError as err:
            results[i] = err
    groups: dict[Generation, list[int]] = {}
    for i in images:
        groups.setdefault(jobs[i].generation, []).append(i)
    for generation, members in groups.items():
        answers = _answer_group(
            loaded,
            constraint,
            generation,
            [jobs[i] for i in members],
            [images.pop(i) for i in members],
            ranged,
        )
        for i, result in zip(members, answers, strict=True):
            results[i] = result
    failed = [r for r in results if isinstance(r, RequestFailed)]
    answered = any(not isinstance(r, Exception) for r in results)
    if failed and not answered and check is not None and not check.model_answers(loaded):
        raise failed[0].cause
    return results


def _generate(
    loaded: Any, constraint: Any, generation: Generation, jobs: list[Job], images: list, price_spread: bool
) -> list[Any]:
    streams = {k: job.on_token for k, job in enumerate(jobs) if job.on_token is not None}

    def on_token(k: int, token: int) -> None:
        if k in streams:
            streams[k](token)

    return generate_completions(
        loaded.model,
        loaded.processor,
        images,
        prompt=PromptFormat(generation.question, loaded.prompt.answer_template),
        batch_size=len(images),
        max_new_tokens=generation.max_new_tokens,
        progress=False,
        temperature=generation.temperature,
        top_p=generation.top_p,
        on_token=on_token if streams else None,
        constraint=constraint,
        price_spread=price_spread,
    )


def _answer_group(
    loaded: Any, constraint: Any, generation: Generation, jobs: list[Job], images: list, price_spread: bool
) -> list[Any]:
    """Answer jobs with one setting; on failure, each alone (a job that already streamed tokens is not
    retried: its client has part of an answer). One Completion or RequestFailed per job."""
    streamed: set[int] = set()

    def watched(k: int, stream: Callable[[int], None]) -> Callable[[int], None]:
        def on_token(token: int) -> None:
            streamed.add(k)
            stream(token)

        return on_token

    jobs_watched = [
        Job(job.images, job.generation, watched(k, job.on_token)) if job.on_token is not None else job
        for k, job in enumerate(jobs)
    ]
    try:
        return _generate(loaded, constraint, generation, jobs_watched, images, price_spread)
    except Exception as err:  # noqa: BLE001  (whatever it is, it is retried or reported per request)
        if len(jobs) == 1:
            log.warning("generation failed for one request: %s: %s", type(err).__name__, err)
            return [RequestFailed(err)]
        first = err
    results: list[Any] = []
    for k, (job, image) in enumerate(zip(jobs, images, strict=True)):
        if k in streamed:
            results.append(RequestFailed(first))
            continue
        try:
            results.append(_generate(loaded, constraint, generation, [job], [image], price_spread)[0])
        except Exception as err:  # noqa: BLE001
            log.warning("generation failed for one request of a batch: %s: %s", type(err).__name__, err)
            results.append(RequestFailed(err))
    return results


class ServeError(HTTPException):
    """An HTTP error with the OpenAI error fields: rendered as ``{"error": {...}}`` on the OpenAI routes and as
    ``{"detail": ...}`` on phivision's own."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, **headers: str
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers or None)
        self.code = code
        self.param = param


@dataclass
class Serving:
    """What the routes share: the model, the bounds, the batcher and the names the server answers to."""

    loaded: Any
    limits: ServeLimits
    batcher: MicroBatcher
    model_name: str
    remote_images: AddressPolicy | None = None
    created: int = 0  # when the server started (the model's `created` in /v1/models)
    price_level: float = PRICE_LEVEL  # the level of every answer's price range
    remote_fetches: asyncio.Semaphore = field(
        init=False
    )  # --max-remote-fetches slots (fetches hold no thread)

    def __post_init__(self) -> None:
        self.remote_fetches = asyncio.Semaphore(self.limits.max_remote_fetches)

    @property
    def question(self) -> str:
        return self.loaded.prompt.question

    def record(self, image: str, completion: Any) -> dict:
        """The answer's record (:func:`prediction_record`), with its price range at the server's level."""
        loaded = self.loaded
        price_range = answer_range(completion, loaded.prompt, loaded.calibration, self.price_level)
        return prediction_record(image, completion.text, loaded.prompt, loaded.currency, price_range)

    @property
    def max_images(self) -> int:
        """Photos one request may send: as many as the model was trained with per prompt."""
        return max(1, getattr(self.loaded, "max_images", 1))

    async def answer(
        self,
        images: bytes | list[bytes],
        generation: Generation,
        on_token: Callable[[int], None] | None = None,
    ):
        """Check every photo's header, queue the request and wait for its Completion (the photos in one prompt,
        in order; one photo's bytes alone are one photo). Raises PhotoError, QueueFull, WorkerStopped,
        TimeoutError, or the generation's own error."""
        if isinstance(images, (bytes, bytearray, memoryview)):
            images = [bytes(images)]
        pixels = 0
        for k, data in enumerate(images):
            try:
                pixels += await run_in_threadpool(image_pixels, data, self.limits.max_pixels)
            except ImageError as err:
                raise PhotoError(k, err) from None
        job = Job(list(images), generation, on_token)
        nbytes = sum(len(data) for data in images)
        return await asyncio.wait_for(
            self.batcher.submit(job, cost=pixels, nbytes=nbytes), self.limits.answer_timeout
        )


def failure(
    err: Exception,
    limits: ServeLimits,
    bad_image: int,
    label: str | list[str],
    param: str | list[str] | None = None,
) -> ServeError:
    """The HTTP error for an exception raised while answering (``bad_image``: the status for an undecodable
    image: 415 on /v1/predict, 400 on the chat API, where OpenAI clients expect 400). ``label`` and ``param``
    name the photos (one per photo, in order) when a request sends several."""
    if isinstance(err, PhotoError):
        label = label[err.index] if isinstance(label, list) else label
        param = param[err.index] if isinstance(param, list) else param
        err = err.error
    if isinstance(err, ImageError):
        # The loader's detail names server-side objects, never the client's file: the reason code only.
        if err.reason == "too_many_pixels":
            message = f"{label}: too_many_pixels (the limit is {limits.max_pixels:,} pixels)"
            return ServeError(413, message, "image_too_large", param)
        if err.found is not None:  # the client's own format, named (the allowlist is no secret)
            message = (
                f"{label}: unsupported_format: a {err.found} image; accepted: {', '.join(ALLOWED_FORMATS)}"
            )
            return ServeError(bad_image, message, "invalid_image", param)
        return ServeError(bad_image, f"{label}: {err.reason}", "invalid_image", param)
    if isinstance(err, QueueFull):
        return ServeError(503, "server busy: too many requests queued", "queue_full", **{"Retry-After": "1"})
    if isinstance(err, WorkerStopped):
        return ServeError(503, f"the model worker is not running: {err}", "worker_stopped")
    if isinstance(err, asyncio.TimeoutError):
        return ServeError(504, "no answer within the request timeout", "timeout")
    if isinstance(err, RequestFailed):  # this request's own failure, logged where it happened
        return ServeError(
            500, f"generation failed for this request: {type(err.cause).__name__}", "generation_failed"
        )
    log.error("answering failed: %s: %s", type(err).__name__, err)
    return ServeError(500, f"generation failed: {type(err).__name__}", "generation_failed")


def prediction_record(
    image: str,
    answer: str,
    prompt: PromptFormat = PromptFormat(),
    currency: str | None = None,
    price_range: PriceRange | None = None,
) -> dict:
    """The JSON shape shared by predict and the HTTP API: the fields parsed with the run's ``prompt`` template,
    the price's ``currency`` (the catalog's, None when the model does not record one), its calibrated range
    (``price_low``, ``price_high`` at ``price_level``; null without a calibration) and the raw answer."""
    parsed = parse_answer(answer, prompt)
    has_range = price_range is not None and price_range.low is not None
    return {
        "image": image,
        "title": parsed.title,
        "category": parsed.category,
        "price": parsed.price,
        "price_low": price_range.low if has_range else None,
        "price_high": price_range.high if has_range else None,
        "price_level": price_range.level if has_range else None,
        "currency": currency,
        "answer": answer,
    }
