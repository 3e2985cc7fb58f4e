"""`phivision serve`: an HTTP API (phivision's own route and an OpenAI-compatible chat API) and a small upload
page around one loaded model.

Requests never touch the model directly. A request reads its image bytes (bounded in size and in time), checks
the image's header (pixel count, before any decoding) and queues the bytes; the :class:`MicroBatcher` gathers
waiting requests into batches bounded in count and in decoded pixels, and one model thread decodes that batch's
images and answers them with batched generation. Waiting requests therefore hold only their compressed bytes,
and the model is only ever used from one thread.

Routes: ``POST /v1/predict`` (multipart upload), ``POST /v1/chat/completions`` and ``GET /v1/models`` (OpenAI
schema, see :mod:`phivision.serve.openai_api`), ``GET /`` (upload page), ``GET /healthz``, ``GET /docs`` (an
offline route list) and ``GET /openapi.json``. docs/serving.md lists the status codes.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from phivision.answer.constrain import AnswerConstraint, short_budget_note
from phivision.answer.taxonomy import model_taxonomy, read_categories_file, with_taxonomy
from phivision.args import PRICE_LEVEL, ServeArgs, ServeLimits
from phivision.netguard import AddressPolicy
from phivision.runs import load_model, resolve_device
from phivision.serve import openai_api
from phivision.serve.core import (
    Generation,
    MicroBatcher,
    ModelCheck,
    ServeError,
    Serving,
    answer_jobs,
    failure,
)
from phivision.serve.guard import server_config
from phivision.serve.limits import allowed_hosts, check_bind

__all__ = ["ServeLimits", "create_app", "serve"]

log = logging.getLogger("phivision.serve")

# Multipart framing (boundaries, part headers) around the file itself: allowed on top of the upload bound.
MULTIPART_OVERHEAD = 16 * 1024
# JSON around a chat request's base64 image (messages, parameters): allowed on top of the encoded upload bound.
JSON_OVERHEAD = 64 * 1024
# Any other route: GET requests and small JSON bodies only.
SMALL_BODY = 64 * 1024
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


# ------------------------------------------------------------------------------------------ middleware


def error_body(
    path: str, status: int, message: str, code: str | None = None, param: str | None = None
) -> dict:
    """The error shape of ``path``: OpenAI's on the OpenAI routes, FastAPI's ``{"detail"}`` elsewhere. A message
    echoing a client's text keeps its lone surrogates as ``\\ud800`` escapes, so the body always encodes."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if path.startswith(OPENAI_PATHS):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message}


async def _send_error(scope: dict, send: Callable, status: int, message: str, code: str) -> None:
    data = json.dumps(error_body(scope["path"], status, message, code)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class HostGuard:
    """ASGI middleware: answer only requests whose ``Host`` header names one of ``hosts`` (400 otherwise).

    A server bound to loopback is reachable from any web page the user opens, through a DNS name that resolves
    to 127.0.0.1 (DNS rebinding); such requests carry the attacker's name in ``Host`` and are refused here.
    """

    def __init__(self, app: Any, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host")
            name = _host_name(host.decode("latin-1")) if host is not None else None
            if name is not None and name not in self.hosts:
                message = f"Host {name!r} is not served here (allowed: {', '.join(sorted(self.hosts))})"
                await _send_error(scope, send, 400, message, "invalid_host")
                return
        await self.app(scope, receive, send)


def _host_name(value: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class BodyTooLarge(ServeError):
    def __init__(self, message: str) -> None:
        super().__init__(413, message, "body_too_large")


class BodyTimeout(ServeError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, f"request body not received within {seconds:g} s", "body_timeout", connection="close"
        )


class BodyGuard:
    """ASGI middleware: bound every request body in size (413) and in time (408).

    Content-Length is checked before anything is read; the body is also counted while it streams in, so a
    chunked or lying client is cut off at the bound. The whole body must arrive within ``timeout`` seconds of
    the request, so a client trickling bytes cannot hold a connection and a buffer indefinitely.
    """

    def __init__(self, app: Any, limits: dict[str, tuple[int, str]], default: int, timeout: float) -> None:
        self.app = app
        self.limits = limits  # path -> (bytes, what to tell a client over it)
        self.default = (default, f"request body too large: at most {default // 1024} KB on this route")
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, too_large = self.limits.get(scope["path"], self.default)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_error(scope, send, 413, too_large, "body_too_large")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received = 0
        done = False

        async def guarded_receive() -> dict:
            nonlocal received, done
            if done:  # after the body: waiting for a disconnect is not bounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(too_large)
                done = not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)


# ------------------------------------------------------------------------------------------ the app


class Prediction(BaseModel):
    """One answer: the fields parsed from the model's text (null when missing) and the text itself."""

    image: str | None
    title: str | None
    category: str | None
    price: float | None
    price_low: float | None  # the price's calibrated range at price_level (null: the model is not calibrated)
    price_high: float | None
    price_level: float | None
    currency: str | None  # the catalog's currency the price is in (null when the model records none)
    answer: str
    images: list[str] | None = None  # with several photos: every file name, in the order sent


class Health(BaseModel):
    status: str  # "ok", or "error" when the model worker died or the latest batch failed (HTTP 503)
    model: str
    served_model_name: str
    queued: int
    requests: int
    batches: int
    failed_batches: int
    max_batch_size: int
    error: str | None = None


def render_page(limits: ServeLimits, source: str, max_images: int = 1) -> str:
    """The upload page: one self-contained HTML file (inline CSS and JS, no external assets)."""
    template = resources.files("phivision.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    photos = f" Up to {max_images} photos of one product, in the order chosen." if max_images > 1 else ""
    page = template.replace("{{max_upload_mb}}", f"{limits.max_upload_mb:g}").replace("{{photos}}", photos)
    page = page.replace(" {{multiple}}", " multiple" if max_images > 1 else "")
    return page.replace("{{model}}", html.escape(source))


def render_docs(schema: dict) -> str:
    """The API reference as one offline HTML page (FastAPI's /docs loads Swagger UI from a CDN)."""
    rows = []
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            statuses = ", ".join(
                f"{code} {html.escape(str(response.get('description', '')))}"
                for code, response in operation.get("responses", {}).items()
            )
            rows.append(
                f"<tr><td><code>{method.upper()} {html.escape(path)}</code></td>"
                f"<td>{html.escape(operation.get('summary', ''))}"
                f"<p>{html.escape(operation.get('description', '') or '')}</p></td><td>{statuses}</td></tr>"
            )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>phivision API</title>"
        "<link rel='icon' href='data:,'><style>body{font:15px/1.5 system-ui,sans-serif;margin:32px;color:#1d2330}"
        "table{border-collapse:collapse}td,th{border:1px solid #d8dee6;padding:6px 10px;vertical-align:top;"
        "text-align:left}p{margin:4px 0 0;color:#5f6b7a;white-space:pre-wrap}</style></head><body>"
        f"<h1>{html.escape(schema['info']['title'])} API</h1><p>The machine-readable schema: "
        "<a href='/openapi.json'>/openapi.json</a>. Usage and examples: docs/serving.md.</p>"
        "<table><tr><th>route</th><th>what</th><th>status codes</th></tr>" + "".join(rows) + "</table>"
        "</body></html>"
    )


def create_app(
    loaded: Any,
    limits: ServeLimits | None = None,
    model_name: str | None = None,
    hosts: frozenset[str] | None = None,
    remote_images: AddressPolicy | None = None,
    price_level: float = PRICE_LEVEL,
) -> FastAPI:
    """The FastAPI app for one loaded model (a :class:`phivision.runs.LoadedModel`).

    Args:
        limits: the server's bounds (validated here).
        model_name: the model id of the OpenAI API (``/v1/models``); default: ``loaded.source``.
        hosts: the ``Host`` names answered (see :func:`phivision.serve.limits.allowed_hosts`); None: any.
        remote_images: fetch http(s) ``image_url``s under this address policy; None: data: URLs only.
        price_level: the level of every answer's price range (a calibrated model's; see
            :mod:`phivision.answer.ranges`).
    """
    limits = (limits or ServeLimits()).validate()
    constraint = AnswerConstraint.for_model(loaded) if limits.constrain else None
    note = short_budget_note(
        loaded.processor, loaded.model.config.vocab_size, constraint, limits.max_new_tokens
    )
    if note:
        log.warning(note)
    check = ModelCheck()
    batcher = MicroBatcher(
        lambda jobs: answer_jobs(loaded, limits, jobs, check),
        max_batch_size=limits.max_batch_size,
        max_wait_s=limits.max_wait_ms / 1000,
        max_queue=limits.max_queue,
        max_batch_cost=limits.max_batch_pixels,
        max_queue_bytes=limits.max_queue_bytes,
    )
    serving = Serving(
        loaded,
        limits,
        batcher,
        model_name or loaded.source,
        remote_images,
        created=int(time.time()),
        price_level=price_level,
    )
    page = render_page(limits, loaded.source, serving.max_images)

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
        docs_url=None,  # FastAPI's pages load their scripts from a CDN; /docs below is self-contained
        redoc_url=None,
    )
    app.state.serving = serving  # for an embedding program (and tests) to reach the batcher and limits
    too_large = f"request body too large: images up to {limits.max_upload_mb:g} MB are accepted"
    body_limits = {
        "/v1/predict": (serving.max_images * (limits.max_upload_bytes + MULTIPART_OVERHEAD), too_large),
        "/v1/chat/completions": (
            serving.max_images * openai_api.max_body_bytes(limits.max_upload_bytes) + JSON_OVERHEAD,
            too_large,
        ),
    }
    app.add_middleware(BodyGuard, limits=body_limits, default=SMALL_BODY, timeout=limits.body_timeout)
    if hosts is not None:
        app.add_middleware(HostGuard, hosts=hosts)  # added last: runs first

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code, param = getattr(err, "code", None), getattr(err, "param", None)
        body = error_body(request.url.path, err.status_code, str(err.detail), code, param)
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith(OPENAI_PATHS):
            return JSONResponse(openai_api.validation_error_body(err), status_code=400)
        return JSONResponse({"detail": err.errors()}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> str:
        return render_docs(app.openapi())

    @app.get(
        "/healthz", response_model=Health, responses={503: {"description": "The model is not answering"}}
    )
    async def healthz() -> JSONResponse:
        """Whether the model answers: "error" (503) when its worker died or the latest batch failed."""
        error = None if batcher.alive else (batcher.worker_error or "the model worker is not running")
        error = error or batcher.last_error
        health = Health(
            status="error" if error else "ok",
            model=loaded.source,
            served_model_name=serving.model_name,
            queued=batcher.queued,
            requests=batcher.requests,
            batches=batcher.batches,
            failed_batches=batcher.failed_batches,
            max_batch_size=limits.max_batch_size,
            error=error,
        )
        return JSONResponse(health.model_dump(), status_code=503 if error else 200)

    @app.post(
        "/v1/predict",
        response_model=Prediction,
        response_model_exclude_unset=True,  # `images` only for several photos: one photo's answer is as before
        responses={
            400: {"description": "More photos than the model takes per prompt"},
            408: {"description": "Request body not received in time"},
            413: {"description": "Upload or image dimensions over the server's bounds"},
            415: {"description": "Not a decodable image"},
            503: {"description": "Too many requests queued, or the model worker stopped"},
            504: {"description": "No answer within the request timeout"},
        },
    )
    async def predict(
        image: list[UploadFile] = File(
            ...,
            description="A product photo (JPEG, PNG, WebP, ...). Repeat the field for several photos of one "
            "product, in order, up to as many as the model was trained with per prompt.",
        ),
    ) -> dict:
        """Answer with the product's name, category and price for its uploaded photo(s), one prompt for all."""
        names = [upload.filename or "upload" for upload in image]
        if len(image) > serving.max_images:
            for upload in image:
                await upload.close()
            raise ServeError(
                400,
                f"{len(image)} photos sent: this model answers from at most {serving.max_images} photo(s) of a "
                "product (it was trained with data.max_images="
                f"{serving.max_images})",
                "too_many_images",
            )
        photos = []
        for name, upload in zip(names, image, strict=True):
            data = await upload.read()
            await upload.close()
            if len(data) > limits.max_upload_bytes:
                raise ServeError(413, f"{name}: upload too large: the limit is {limits.max_upload_mb:g} MB")
            photos.append(data)
        generation = Generation(serving.question, limits.max_new_tokens)
        try:
            completion = await serving.answer(photos, generation)
        except Exception as err:
            raise failure(err, limits, 415, names) from None
        record = serving.record(names[0], completion)
        if len(names) > 1:
            record["images"] = names
        return record

    openai_api.add_routes(app, serving)
    return app


def serve(args: ServeArgs) -> None:
    """Load ``args.model`` (RUN, checkpoint or hub id) and serve it with uvicorn until interrupted.

    Every argument is checked before the model loads (a bad one raises PhivisionError naming its flag).
    """
    check_bind(args.host, args.port)
    device = resolve_device(args.loading.device)
    if args.answering.categories is not None:
        read_categories_file(args.answering.categories)  # a broken file stops before the model loads
    loaded = load_model(args.model, device=device, dtype=args.loading.dtype)
    for note in loaded.notes:
        log.warning(note)

    loaded = with_taxonomy(loaded, model_taxonomy(loaded, args.answering.categories))
    private = args.allow_private_image_hosts
    remote = (
        AddressPolicy(allow_loopback=private, allow_private=private) if args.allow_remote_images else None
    )
    app = create_app(
        loaded,
        args.limits,
        model_name=args.served_model_name or str(args.model),
        hosts=allowed_hosts(args.host, args.allowed_host or ()),
        remote_images=remote,
        price_level=args.answering.price_level,
    )
    uvicorn.Server(server_config(app, args.host, args.port, args.limits)).run()
