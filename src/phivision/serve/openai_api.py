"""The OpenAI-compatible routes of ``phivision serve``: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A request is one user message with one or more ``image_url`` parts, photos of one product in order (``data:``
URLs; http(s) only when the server allows remote images), and optional text, which replaces the question the
model was trained on (leave it out to ask that question). ``response_format`` ``json_object`` or ``json_schema``
makes the message content a JSON object with ``title``, ``category``, ``price`` and ``currency`` (null where the
answer lacks a field), ``json_schema`` narrowing it to the properties the schema names. ``stream: true`` sends
server-sent events as tokens are generated. Errors use OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}``, so the official client raises its usual exception classes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from phivision.netguard import BlockedAddress
from phivision.serve.core import Generation, ServeError, Serving, failure
from phivision.serve.fetch import FetchError, FetchTooLarge, fetch_image

ANSWER_FIELDS = ("title", "category", "price", "price_low", "price_high", "currency")
# Text the tokenizer would read as control tokens (image slots, turn ends): refused in a client's question.
SPECIAL_TOKEN = re.compile(r"<\|[^|<>]*\|>|</?s>")
MAX_QUESTION_CHARS = 2000
# A temperature below this samples like greedy decoding but overflows the logits (1e-300 makes every logit
# infinite): it is answered greedily, as vLLM does.
MIN_TEMPERATURE = 1e-5
# Parameters that change nothing when left at these values; any other value is refused rather than ignored.
NEUTRAL = {"n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0}
# Parameters that only label the request for the client's own bookkeeping.
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
END = object()  # marks the end of a stream's text pieces


def max_body_bytes(max_upload_bytes: int) -> int:
    """Body bound of a chat request: the image bound in base64 (4 characters per 3 bytes)."""
    return -(-max_upload_bytes // 3) * 4


# ------------------------------------------------------------------------------------------ schema


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat request this server honours (other parameters are refused unless neutral)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(
        None, ge=0, le=2, description="0 (the default here), or below 1e-5: greedy decoding."
    )
    top_p: float | None = Field(None, gt=0, le=1)
    response_format: dict[str, Any] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None


class ChatAnswer(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatAnswer
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "phivision"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def invalid(message: str, param: str | None, code: str = "invalid_request", status: int = 400) -> ServeError:
    return ServeError(status, message, code, param)


def validation_error_body(err: RequestValidationError) -> dict:
    """FastAPI's validation errors as OpenAI's 400 body, naming the first bad parameter."""
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    else:
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


# ------------------------------------------------------------------------------------------ reading a request


def check_parameters(request: ChatRequest) -> None:
    """Refuse parameters this server cannot honour, instead of silently ignoring them."""
    for name, value in (request.model_extra or {}).items():
        if value is None or name in IGNORED or value in ([], {}):
            continue
        if name == "seed" and not request.temperature:  # greedy answers do not depend on a seed
            continue
        if name in NEUTRAL and value == NEUTRAL[name]:
            continue
        raise invalid(
            f"unsupported parameter {name!r} = {value!r} for this server", name, "unsupported_parameter"
        )


def read_message(request: ChatRequest, max_images: int = 1) -> tuple[list[tuple[str, str]], str | None]:
    """The image URLs of the one user message in order, each with its ``param`` path (for error messages), and
    its text. Several ``image_url`` parts are several photos of one product, up to ``max_images``."""
    if len(request.messages) != 1 or request.messages[0].role != "user":
        roles = [message.role for message in request.messages]
        raise invalid(
            f"send exactly one user message holding image_url parts and optional text (got roles {roles}): "
            "the model answers one question about one product's photos",
            "messages",
        )
    content = request.messages[0].content
    if not isinstance(content, list):
        raise invalid(
            "the user message needs an image_url part (content as a list of parts)", "messages[0].content"
        )
    images, texts = [], []
    for j, part in enumerate(content):
        param = f"messages[0].content[{j}]"
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid("a text part needs its text as a string", f"{param}.text")
            if not _is_unicode(part["text"]):
                raise invalid(
                    "the text is not valid Unicode (it holds a lone surrogate such as \\ud800)",
                    f"{param}.text",
                )
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise invalid("image_url.url must be a string", f"{param}.image_url.url")
            images.append((url, f"{param}.image_url"))
        else:
            raise invalid(f"unsupported content part type {kind!r} (use text or image_url)", f"{param}.type")
    if not images:
        raise invalid("send an image_url part (got none)", "messages[0].content")
    if len(images) > max_images:
        raise invalid(
            f"send at most {max_images} image_url part(s), photos of one product (got {len(images)}): this model "
            f"was trained with data.max_images={max_images}",
            "messages[0].content",
            "too_many_images",
        )
    text = "\n".join(texts).strip()
    if SPECIAL_TOKEN.search(text):
        raise invalid(
            "the text must not contain special tokens such as <|image_1|> or <|end|>", "messages[0].content"
        )
    if len(text) > MAX_QUESTION_CHARS:
        raise invalid(f"the text is longer than {MAX_QUESTION_CHARS} characters", "messages[0].content")
    return images, text or None


def _is_unicode(text: str) -> bool:
    """False for text holding a lone surrogate (JSON lets ``\\ud800`` through; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_generation(request: ChatRequest, serving: Serving, question: str | None) -> Generation:
    """How to answer a chat request. A ``max_tokens`` (or ``max_completion_tokens``) above the server's
    ``--max-new-tokens`` is capped to it, as vLLM caps it to the context: clients send 256 to 4096 by habit.
    An answer the cap cuts ends with ``finish_reason: "length"``."""
    limit = serving.limits.max_new_tokens
    wanted = request.max_completion_tokens or request.max_tokens or limit
    temperature = request.temperature or 0.0
    return Generation(
        question=question or serving.question,
        max_new_tokens=min(wanted, limit),
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,  # tiny: greedy (the limit)
        top_p=request.top_p if request.top_p is not None else 1.0,
    )


def read_response_format(response_format: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The answer fields to return as a JSON object, or None for the plain text answer."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANSWER_FIELDS
    if kind != "json_schema":
        raise invalid(
            f"response_format.type {kind!r}: expected text, json_object or json_schema",
            "response_format.type",
        )
    spec = response_format.get("json_schema")
    if spec is not None and not isinstance(spec, dict):
        raise invalid("response_format.json_schema must be an object", "response_format.json_schema")
    schema = (spec or {}).get("schema")
    if schema is None:
        return ANSWER_FIELDS
    param = "response_format.json_schema.schema"
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise invalid("the schema must describe a JSON object", param)
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    if not isinstance(properties, dict):
        raise invalid("the schema's properties must be an object", f"{param}.properties")
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise invalid("the schema's required must be a list of property names", f"{param}.required")
    named = list(properties) + [k for k in required if k not in properties]
    unknown = [name for name in named if name not in ANSWER_FIELDS]
    if unknown:
        raise invalid(
            f"this server answers with {', '.join(ANSWER_FIELDS)}; the schema asks for {', '.join(unknown)}",
            param,
            "unsupported_schema",
        )
    return tuple(named) or ANSWER_FIELDS


async def read_image(url: str, param: str, serving: Serving) -> bytes:
    """The image bytes of a ``data:`` URL, or of an http(s) URL when the server allows remote images."""
    limit = serving.limits.max_upload_bytes
    too_large = f"{param}: the image is larger than {serving.limits.max_upload_mb:g} MB"
    if url[:5].lower() == "data:":
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise invalid(f"{param}: a data: URL needs a comma before its data", param, "invalid_image_url")
        if header.lower().endswith(";base64"):
            if len(payload) > max_body_bytes(limit):
                raise ServeError(413, too_large, "image_too_large", param)
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise invalid(
                    f"{param}: the data: URL is not valid base64", param, "invalid_image_url"
                ) from None
        else:
            data = unquote_to_bytes(payload)
        if len(data) > limit:
            raise ServeError(413, too_large, "image_too_large", param)
        return data
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise invalid(
            f"{param}: expected a data: URL (or http(s) when allowed), got {scheme}:",
            param,
            "invalid_image_url",
        )
    if serving.remote_images is None:
        raise invalid(
            f"{param}: http(s) image URLs are off on this server; send the image as a data: URL "
            "(or start the server with --allow-remote-images)",
            param,
            "remote_images_disabled",
        )
    limits = serving.limits
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.remote_image_timeout
    try:
        await asyncio.wait_for(serving.remote_fetches.acquire(), limits.remote_image_timeout)
    except asyncio.TimeoutError:
        raise ServeError(
            503,
            "too many remote images are being fetched; try again shortly",
            "remote_fetches_busy",
            param,
            **{"Retry-After": "1"},
        ) from None
    try:
        return await fetch_image(
            url, serving.remote_images, limit, max(0.001, deadline - loop.time()), limits.max_redirects
        )
    except BlockedAddress as err:
        raise invalid(
            f"{param}: refused to fetch: {err.detail} ({err.reason})", param, "image_url_blocked"
        ) from None
    except FetchTooLarge:
        raise ServeError(413, too_large, "image_too_large", param) from None
    except FetchError as err:
        code = "invalid_image_url" if err.reason in ("bad_url", "bad_redirect") else "image_url_unreachable"
        raise invalid(f"{param}: could not fetch the image: {err} ({err.reason})", param, code) from None
    finally:
        serving.remote_fetches.release()


# ------------------------------------------------------------------------------------------ answering


def message_content(serving: Serving, completion: Any, fields: tuple[str, ...] | None) -> str:
    """The assistant message: the model's answer, or the JSON object of its fields."""
    if fields is None:
        return completion.text
    record = serving.record("image_url", completion)  # the one record builder
    return json.dumps({name: record.get(name) for name in fields}, ensure_ascii=False)


class TextPieces:
    """Turns one answer's token ids, as they are generated, into text pieces whose concatenation is the answer.

    Runs on the model thread and hands each piece to ``emit``. Stops at the first stop token; holds back a
    character split across tokens and trailing whitespace (the final answer is stripped).
    """

    def __init__(self, tokenizer: Any, stop_ids: set[int], emit: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.emit = emit
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def __call__(self, token: int) -> None:
        if self.done:
            return
        if token in self.stop_ids:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or not text.startswith(self.sent) or len(text) == len(self.sent):
            return
        self.emit(text[len(self.sent) :])
        self.sent = text


def completion_body(serving: Serving, completion: Any, content: str, request_id: str) -> dict:
    return ChatCompletion(
        id=request_id,
        created=int(time.time()),
        model=serving.model_name,
        choices=[
            ChatChoice(
                index=0,
                message=ChatAnswer(content=content),
                finish_reason="stop" if completion.finished else "length",
            )
        ],
        usage=usage(completion),
    ).model_dump()


def usage(completion: Any) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class ChunkWriter:
    """The ``chat.completion.chunk`` events of one streamed answer."""

    def __init__(self, serving: Serving, request_id: str, include_usage: bool) -> None:
        self.base = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": serving.model_name,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage

    def chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if self.include_usage else {}
        return sse({**self.base, "choices": [choice], **extra})

    def usage(self, completion: Any) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage(completion).model_dump()})


async def stream_answer(
    serving: Serving,
    writer: ChunkWriter,
    first: Any,
    pieces: asyncio.Queue,
    task: asyncio.Task,
    fields: tuple[str, ...] | None,
    deadline: float,
) -> AsyncIterator[bytes]:
    """Role chunk, text pieces as they arrive, the rest of the answer (or its JSON), finish, usage, [DONE]."""
    loop = asyncio.get_running_loop()
    try:
        yield writer.chunk({"role": "assistant", "content": ""})
        sent = ""
        item = first
        while item is not END:
            sent += item
            yield writer.chunk({"content": item})
            item = await asyncio.wait_for(pieces.get(), max(0.0, deadline - loop.time()))
        completion = task.result()
        content = message_content(serving, completion, fields)
        rest = content[len(sent) :] if content.startswith(sent) else ""
        if rest:
            yield writer.chunk({"content": rest})
        yield writer.chunk({}, "stop" if completion.finished else "length")
        if writer.include_usage:
            yield writer.usage(completion)
        yield sse("[DONE]")
    except Exception as err:  # after the 200 header: report in the stream, as OpenAI does
        error = failure(err, serving.limits, 400, "image")
        body = {"message": str(error.detail), "type": "server_error", "param": None, "code": error.code}
        yield sse({"error": body})
    finally:
        if not task.done():
            task.cancel()  # the client went away: the batch drops it if it has not started


async def chat_completions(request: ChatRequest, serving: Serving) -> Any:
    """Answer one chat request (see the module docstring)."""
    if request.model != serving.model_name:
        raise ServeError(
            404,
            f"the model {request.model!r} does not exist (this server serves {serving.model_name!r})",
            "model_not_found",
            "model",
        )
    check_parameters(request)
    images, text = read_message(request, serving.max_images)
    generation = read_generation(request, serving, text)
    fields = read_response_format(request.response_format)
    data = [await read_image(url, param, serving) for url, param in images]
    image_param = [param for _, param in images]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    if not request.stream:
        try:
            completion = await serving.answer(data, generation)
        except Exception as err:
            raise failure(err, serving.limits, 400, "image_url", image_param) from None
        return completion_body(serving, completion, message_content(serving, completion, fields), request_id)

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    on_token = None
    if fields is None:  # a JSON answer can only be written once the whole answer is known
        processor = serving.loaded.processor
        emit = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)  # noqa: E731
        on_token = TextPieces(processor.tokenizer, {int(t) for t in processor.stop_token_ids}, emit)
    task = asyncio.create_task(serving.answer(data, generation, on_token))
    task.add_done_callback(lambda _: pieces.put_nowait(END))  # after every piece: both go through the loop
    deadline = loop.time() + serving.limits.answer_timeout
    try:
        first = await asyncio.wait_for(pieces.get(), serving.limits.answer_timeout)
    except asyncio.TimeoutError:
        task.cancel()
        raise failure(asyncio.TimeoutError(), serving.limits, 400, "image_url") from None
    if first is END and task.exception() is not None:  # failed before any text: a plain error response
        raise failure(task.exception(), serving.limits, 400, "image_url", image_param) from None
    include_usage = bool((request.stream_options or {}).get("include_usage"))
    events = stream_answer(
        serving, ChunkWriter(serving, request_id, include_usage), first, pieces, task, fields, deadline
    )
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def add_routes(app: FastAPI, serving: Serving) -> None:
    """Register ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{id}`` on ``app``."""
    errors = {
        400: {"description": "Bad request: parameters, message or image (OpenAI error body)"},
        404: {"description": "Unknown model id"},
        408: {"description": "Request body not received in time"},
        413: {"description": "Request body, image file or image dimensions over the server's bounds"},
        503: {"description": "Too many requests queued, or the model worker stopped"},
        504: {"description": "No answer within the request timeout"},
    }

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=errors)
    async def create_chat_completion(request: ChatRequest) -> Any:
        """OpenAI-compatible chat completion: one user message with image_url parts (one product) and optional text."""
        return await chat_completions(request, serving)

    def card() -> ModelCard:
        return ModelCard(id=serving.model_name, created=serving.created)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The one model this server answers with (its id is the ``model`` of chat requests)."""
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: errors[404]})
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id != serving.model_name:
            raise ServeError(404, f"the model {model_id!r} does not exist", "model_not_found", "model")
        return card()
