"""The OpenAI-compatible API, driven by the official ``openai`` client against live uvicorn servers on loopback.

Two models: the LoRA run's tiny model (random answers) and a tiny model taught, in a few training steps, to answer
one photo with a full product line, so JSON answers carry real fields and streaming has many tokens to send.
Remote image URLs are fetched from a local image server that also misbehaves (redirects to a metadata address,
trickles bytes, sends too much).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from serve_helpers import TAUGHT_ANSWER, ServerThread, data_url, png_bytes, teach_answer

from phivision.netguard import AddressPolicy
from phivision.runs import LoadedModel, load_model
from phivision.serve.server import ServeLimits, create_app

LIMITS = ServeLimits(
    max_batch_size=4, max_upload_mb=0.25, max_pixels=1_000_000, max_new_tokens=8, constrain=False
)  # free text: the length cap holds exactly
TAUGHT_LIMITS = ServeLimits(max_batch_size=4, max_new_tokens=48, remote_image_timeout=1.5)
LOOPBACK_ONLY = AddressPolicy(allow_loopback=True, allow_private=False)  # tests may only touch loopback
NAME = "phivision-tiny"


def client_for(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def image_message(url: str, text: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def shirt_png() -> bytes:
    return png_bytes(size=(90, 70), color=(30, 120, 200))


@pytest.fixture(scope="module")
def lora_server(lora_run: Path) -> Iterator[ServerThread]:
    app = create_app(load_model(lora_run, device="cpu"), LIMITS, model_name=NAME)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def taught(tiny_checkpoint: Path) -> LoadedModel:
    loaded = teach_answer(Path(tiny_checkpoint), Image.open(io.BytesIO(shirt_png())).convert("RGB"))
    loaded.currency = "USD"  # as the catalog's currency will be recorded with a run
    return loaded


@pytest.fixture(scope="module")
def taught_server(taught: LoadedModel) -> Iterator[ServerThread]:
    app = create_app(taught, TAUGHT_LIMITS, model_name=NAME, remote_images=LOOPBACK_ONLY)
    with ServerThread(app) as running:
        yield running


# ------------------------------------------------------------------------------------------ answers


def test_models_list_the_served_model(lora_server: ServerThread) -> None:
    client = client_for(lora_server)
    models = client.models.list()
    assert [model.id for model in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_plain_answer_equals_the_predict_route(lora_server: ServerThread) -> None:
    photo = png_bytes()
    expected = httpx.post(
        f"{lora_server.url}/v1/predict", files={"image": ("p.png", photo, "image/png")}, timeout=120
    ).json()
    reply = client_for(lora_server).chat.completions.create(
        model=NAME, messages=image_message(data_url(photo))
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["answer"]  # same trained question, greedy, same length cap
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == NAME and reply.id.startswith("chatcmpl-")
    assert reply.usage.prompt_tokens > 10  # the image's tokens count
    assert 1 <= reply.usage.completion_tokens <= LIMITS.max_new_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The run's own question, sent as text, asks exactly the same thing.
    same = client_for(lora_server).chat.completions.create(
        model=NAME, messages=image_message(data_url(photo), text="Which product is this?")
    )
    assert same.choices[0].message.content == expected["answer"]


def test_taught_model_answers_in_full(taught_server: ServerThread) -> None:
    reply = client_for(taught_server).chat.completions.create(
        model=NAME, messages=image_message(data_url(shirt_png())), max_tokens=48
    )
    assert reply.choices[0].message.content == TAUGHT_ANSWER
    assert reply.choices[0].finish_reason == "stop"
    short = client_for(taught_server).chat.completions.create(
        model=NAME, messages=image_message(data_url(shirt_png())), max_tokens=3
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert TAUGHT_ANSWER.startswith(short.choices[0].message.content)


def test_json_answers(taught_server: ServerThread) -> None:
    client = client_for(taught_server)
    messages = image_message(data_url(shirt_png()))
    expected = {"title": "Check Cotton Shirt", "category": "shirts", "price": 890.0, "currency": "USD"}

    reply = client.chat.completions.create(
        model=NAME, messages=messages, response_format={"type": "json_object"}
    )
    assert json.loads(reply.choices[0].message.content) == expected

    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "price": {"type": "number"}},
        "required": ["title", "price"],
        "additionalProperties": False,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "product", "schema": schema, "strict": True},
    }
    reply = client.chat.completions.create(model=NAME, messages=messages, response_format=response_format)
    assert json.loads(reply.choices[0].message.content) == {"title": "Check Cotton Shirt", "price": 890.0}

    full = {"name": "product", "schema": {"type": "object", "properties": {k: {} for k in expected}}}
    reply = client.chat.completions.create(
        model=NAME, messages=messages, response_format={"type": "json_schema", "json_schema": full}
    )
    assert json.loads(reply.choices[0].message.content) == expected

    bad = {"name": "x", "schema": {"type": "object", "properties": {"brand": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=NAME, messages=messages, response_format={"type": "json_schema", "json_schema": bad}
        )
    assert err.value.code == "unsupported_schema" and "brand" in err.value.message


def test_json_answer_of_a_random_model_has_null_fields(lora_server: ServerThread) -> None:
    reply = client_for(lora_server).chat.completions.create(
        model=NAME, messages=image_message(data_url(png_bytes())), response_format={"type": "json_object"}
    )
    fields = json.loads(reply.choices[0].message.content)
    assert set(fields) == {"title", "category", "price", "currency"}
    assert fields["currency"] is None  # this model records no currency


def test_sampling_with_temperature(taught_server: ServerThread) -> None:
    reply = client_for(taught_server).chat.completions.create(
        model=NAME, messages=image_message(data_url(shirt_png())), temperature=1.0, top_p=0.9, max_tokens=6
    )
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens <= 6


# ------------------------------------------------------------------------------------------ streaming


def collect(stream) -> tuple[str, list[str], str | None, object]:
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return "".join(pieces), pieces, finish, usage


def test_streaming_sends_the_answer_token_by_token(taught_server: ServerThread) -> None:
    client = client_for(taught_server)
    messages = image_message(data_url(shirt_png()))
    whole = client.chat.completions.create(model=NAME, messages=messages)
    stream = client.chat.completions.create(
        model=NAME, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    text, pieces, finish, usage = collect(stream)
    assert text == whole.choices[0].message.content == TAUGHT_ANSWER
    assert len(pieces) > 5  # pieces as tokens are generated, not one block at the end
    assert finish == "stop"
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens

    stream = client.chat.completions.create(
        model=NAME, messages=messages, stream=True, response_format={"type": "json_object"}
    )
    text, _, finish, _ = collect(stream)
    assert json.loads(text)["title"] == "Check Cotton Shirt" and finish == "stop"


def test_streaming_request_with_a_bad_image_fails_before_streaming(taught_server: ServerThread) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client_for(taught_server).chat.completions.create(
            model=NAME, messages=image_message(data_url(png_bytes()[:60])), stream=True
        )
    assert err.value.code == "invalid_image"


# ------------------------------------------------------------------------------------------ errors


def test_bad_image_is_400_with_an_openai_error_body(lora_server: ServerThread) -> None:
    client = client_for(lora_server)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=NAME, messages=image_message(data_url(b"name,price\nbag,1290\n", "text/csv"))
        )
    assert err.value.status_code == 400
    assert err.value.code == "invalid_image" and err.value.type == "invalid_request_error"
    assert err.value.param == "messages[0].content[0].image_url"
    assert "not_an_image" in err.value.message
    body = err.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}

    with pytest.raises(openai.BadRequestError) as err:  # truncated: found when the model thread decodes it
        client.chat.completions.create(
            model=NAME, messages=image_message(data_url(png_bytes(size=(300, 200))[:300]))
        )
    assert err.value.code == "invalid_image"

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=image_message("data:image/png;base64,***"))
    assert err.value.code == "invalid_image_url"


def test_oversized_body_and_image_are_413(lora_server: ServerThread) -> None:
    client = client_for(lora_server)
    big = png_bytes() + b"\0" * 400_000  # over the 0.25 MB bound
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=NAME, messages=image_message(data_url(big)))
    assert err.value.status_code == 413 and err.value.code == "body_too_large"
    with pytest.raises(openai.APIStatusError) as err:  # fits the body, but over the pixel bound (1 MP)
        client.chat.completions.create(
            model=NAME, messages=image_message(data_url(png_bytes(size=(1200, 1000))))
        )
    assert err.value.status_code == 413 and err.value.code == "image_too_large"


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"model": "gpt-4o"}, "model", "model_not_found"),
        ({"max_tokens": 9}, "max_tokens", "max_tokens_too_large"),
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"stop": ["\n"]}, "stop", "unsupported_parameter"),
        ({"seed": 7, "temperature": 0.8}, "seed", "unsupported_parameter"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content[0].text",
            "invalid_request",
        ),
        ({"temperature": 2.5}, "temperature", None),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_request"),
        (
            {"messages": [{"role": "system", "content": "Be brief."}, *image_message("data:,x")]},
            "messages",
            "invalid_request",
        ),
        (
            {"messages": [{"role": "user", "content": "What is this?"}]},
            "messages[0].content",
            "invalid_request",
        ),
        (
            {"messages": image_message("data:,x", text="<|image_2|> and more")},
            "messages[0].content",
            "invalid_request",
        ),
        (
            {"messages": image_message("https://example.com/bag.jpg")},
            "messages[0].content[0].image_url",
            "remote_images_disabled",
        ),
        (
            {"messages": image_message("file:///etc/passwd")},
            "messages[0].content[0].image_url",
            "invalid_image_url",
        ),
        # issue 20, case 10: malformed json_schema values are 400s naming the parameter, never a plain 500
        (
            {"response_format": {"type": "json_schema", "json_schema": "title"}},
            "response_format.json_schema",
            "invalid_request",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"properties": 5}}}},
            "response_format.json_schema.schema.properties",
            "invalid_request",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"required": 7}}}},
            "response_format.json_schema.schema.required",
            "invalid_request",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"required": [["x"]]}}}},
            "response_format.json_schema.schema.required",
            "invalid_request",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": ["object"]}}}},
            "response_format.json_schema.schema",
            "invalid_request",
        ),
    ],
)
def test_bad_requests_name_the_parameter(
    lora_server: ServerThread, change: dict, param: str, code: str | None
) -> None:
    request = {"model": NAME, "messages": image_message(data_url(png_bytes())), **change}
    expected = openai.NotFoundError if code == "model_not_found" else openai.BadRequestError
    with pytest.raises(expected) as err:
        client_for(lora_server).chat.completions.create(**request)
    assert err.value.param == param and err.value.code == code, err.value.message


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        (  # issue 20, case 1: text no tokenizer can encode is refused up front, alone
            {"messages": image_message(data_url(png_bytes()), text="\ud800x")},
            "messages[0].content[1].text",
            "invalid_request",
        ),
        (  # echoed in the message: the error body itself must still encode
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"properties": {"\ud800": {}}}},
                }
            },
            "response_format.json_schema.schema",
            "unsupported_schema",
        ),
    ],
)
def test_lone_surrogates_are_400(lora_server: ServerThread, change: dict, param: str, code: str) -> None:
    """JSON may carry a lone surrogate as the escape \\ud800 (the official client cannot send one; json.dumps
    writes it): a 400 naming the parameter, with a body that is valid UTF-8 JSON."""
    request = {"model": NAME, "messages": image_message(data_url(png_bytes())), **change}
    response = httpx.post(
        f"{lora_server.url}/v1/chat/completions",
        content=json.dumps(request),  # ensure_ascii: the surrogate travels as an escape
        headers={"content-type": "application/json"},
        timeout=120,
    )
    assert response.status_code == 400, response.text
    error = json.loads(response.content.decode("utf-8"))["error"]
    assert error["param"] == param and error["code"] == code, error


def test_body_that_is_not_json_is_400(lora_server: ServerThread) -> None:
    response = httpx.post(
        f"{lora_server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------ remote images


class ImageServer:
    """A loopback image server that also misbehaves: redirects to a metadata address, trickles, oversends."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.paths.append(self.path)
                if self.path == "/shirt.png":
                    self.reply(200, server.image)
                elif self.path == "/moved":
                    self.redirect("/shirt.png")
                elif self.path == "/to-metadata":
                    self.redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
                elif self.path == "/loop":
                    self.redirect("/loop")
                elif self.path == "/huge":
                    self.reply(200, b"\0" * (2 * 1024 * 1024))
                elif self.path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"\0" * 100)
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass
                else:
                    self.reply(404, b"missing")

            def reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    with ImageServer(shirt_png()) as server:
        yield server


def test_remote_image_urls_are_fetched_when_allowed(
    taught_server: ServerThread, image_server: ImageServer
) -> None:
    client = client_for(taught_server)
    for path in ("/shirt.png", "/moved"):
        reply = client.chat.completions.create(model=NAME, messages=image_message(image_server.url + path))
        assert reply.choices[0].message.content == TAUGHT_ANSWER, path


@pytest.mark.parametrize(
    ("path", "error", "code", "reason"),
    [
        ("/to-metadata", openai.BadRequestError, "image_url_blocked", "blocked_link_local"),
        ("/loop", openai.BadRequestError, "image_url_unreachable", "too_many_redirects"),
        ("/missing", openai.BadRequestError, "image_url_unreachable", "http_404"),
        ("/trickle", openai.BadRequestError, "image_url_unreachable", "timeout"),
    ],
)
def test_remote_image_misbehaviour(
    taught_server: ServerThread, image_server: ImageServer, path: str, error: type, code: str, reason: str
) -> None:
    started = time.monotonic()
    with pytest.raises(error) as err:
        client_for(taught_server).chat.completions.create(
            model=NAME, messages=image_message(image_server.url + path)
        )
    assert err.value.code == code and reason in err.value.message, err.value.message
    assert time.monotonic() - started < 30


def test_huge_remote_image_is_cut_at_the_upload_bound(taught: LoadedModel, image_server: ImageServer) -> None:
    limits = ServeLimits(max_upload_mb=1, max_new_tokens=4)
    app = create_app(taught, limits, model_name=NAME, remote_images=LOOPBACK_ONLY)
    with ServerThread(app) as server, pytest.raises(openai.APIStatusError) as err:
        client_for(server).chat.completions.create(
            model=NAME, messages=image_message(image_server.url + "/huge")
        )
    assert err.value.status_code == 413 and err.value.code == "image_too_large"


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/photo.png",  # an unclosed IPv6 literal
        "http://127.0.0.1:99999/photo.png",  # a port out of range
        "http://127.0.0.1:port/photo.png",
        "http://exa mple.com/photo.png",
        "http://127.0.0.1/ph\x00oto.png",
        "http:///photo.png",  # no host
        "https://bücher.example/photo.png",
    ],
)
def test_malformed_remote_image_urls_are_400(taught_server: ServerThread, url: str) -> None:
    """Issue 20, case 10: a URL that cannot be fetched as written is an OpenAI-style 400, never a plain 500."""
    with pytest.raises(openai.BadRequestError) as err:
        client_for(taught_server).chat.completions.create(model=NAME, messages=image_message(url))
    assert err.value.code == "invalid_image_url" and err.value.param == "messages[0].content[0].image_url"


def test_remote_images_never_reach_loopback_or_metadata_by_default(
    taught: LoadedModel, image_server: ImageServer
) -> None:
    """--allow-remote-images alone: public addresses only. The image server must see no request at all."""
    public_only = AddressPolicy(allow_loopback=False, allow_private=False)
    seen = len(image_server.paths)
    with ServerThread(
        create_app(taught, TAUGHT_LIMITS, model_name=NAME, remote_images=public_only)
    ) as server:
        client = client_for(server)
        for url, reason in (
            (image_server.url + "/shirt.png", "blocked_loopback"),
            (image_server.url.replace("127.0.0.1", "localhost") + "/shirt.png", "blocked_loopback"),
            ("http://169.254.169.254/latest/meta-data/", "blocked_link_local"),
            ("http://[::ffff:169.254.169.254]/", "blocked_link_local"),
            ("http://10.0.0.1/bag.jpg", "blocked_private"),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model=NAME, messages=image_message(url))
            assert err.value.code == "image_url_blocked" and reason in err.value.message, url
    assert len(image_server.paths) == seen
