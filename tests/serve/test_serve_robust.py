"""Issue 20: one bad request fails alone, and the server survives slow and flooding clients. A real tiny model
behind real uvicorn servers on loopback; raw sockets for slow clients, the official client for chats."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServeProcess, ServerThread, data_url, png_bytes, silent_host

from phivision.runs import LoadedModel, load_model
from phivision.serve.core import Generation, RequestFailed
from phivision.serve.server import ServeLimits, create_app

LIMITS = ServeLimits(max_batch_size=8, max_wait_ms=300, max_new_tokens=4, constrain=False)


@pytest.fixture(scope="module")
def loaded(lora_run: Path) -> LoadedModel:
    return load_model(lora_run, device="cpu")


@pytest.fixture(scope="module")
def server(loaded: LoadedModel) -> Iterator[ServerThread]:
    with ServerThread(create_app(loaded, LIMITS, model_name="tiny")) as running:
        yield running


def chat(url: str, **change) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **change}
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=json.dumps(body),
        timeout=120,
        headers={"content-type": "application/json"},
    )


def health(url: str) -> dict:
    response = httpx.get(f"{url}/healthz", timeout=30)
    return {"code": response.status_code, **response.json()}


# ------------------------------------------------------------------------------------ case 1: isolation


def test_a_request_whose_own_generation_fails_fails_alone(server: ServerThread) -> None:
    """Six good requests and one whose sampling cannot be computed (temperature 1e-300 overflows the logits;
    handed to the batcher directly, past the API's clamp) in one batch: the six are answered, the bad one
    alone gets RequestFailed, and /healthz stays ok."""
    serving = server.app.state.serving
    loop = serving.batcher._task.get_loop()  # the server's event loop
    data = png_bytes()

    async def one_batch() -> list:
        good = [serving.answer(data, Generation(serving.question, 4)) for _ in range(6)]
        bad = serving.answer(data, Generation(serving.question, 4, temperature=1e-300))
        return await asyncio.gather(*good, bad, return_exceptions=True)

    before = health(server.url)
    results = asyncio.run_coroutine_threadsafe(one_batch(), loop).result(timeout=300)
    assert [type(r).__name__ for r in results] == ["Completion"] * 6 + ["RequestFailed"]
    assert isinstance(results[-1].cause, RuntimeError)  # torch: probabilities inf/nan
    after = health(server.url)
    assert (
        after["code"] == 200
        and after["status"] == "ok"
        and after["failed_batches"] == before["failed_batches"]
    )
    assert after["batches"] == before["batches"] + 1  # one batch: they really were answered together


def test_one_failing_request_on_an_idle_server_leaves_it_healthy(server: ServerThread) -> None:
    """A batch of one that fails: the model still answers a known-good photo, so the failure is the request's
    (500 for it), not the server's: /healthz stays 200 (a load balancer keeps the node)."""
    serving = server.app.state.serving
    loop = serving.batcher._task.get_loop()
    bad = serving.answer(png_bytes(), Generation(serving.question, 4, temperature=1e-300))
    with pytest.raises(RequestFailed):
        asyncio.run_coroutine_threadsafe(bad, loop).result(timeout=300)
    assert health(server.url)["code"] == 200
    assert chat(server.url).status_code == 200


def test_a_broken_model_turns_health_503_until_a_batch_succeeds(lora_run: Path) -> None:
    """The other side of case 1: health reflects the model. A model that fails every generation (its output
    layer's weights lost) fails the known-good check too: the request gets its 500 and /healthz says 503 with
    the reason, so a load balancer drops the node; repaired, the next answered batch makes it 200 again."""
    import torch

    loaded = load_model(lora_run, device="cpu")
    head = loaded.model.get_output_embeddings()
    weight = head.weight
    with ServerThread(create_app(loaded, LIMITS, model_name="tiny")) as server:
        assert chat(server.url).status_code == 200
        head.weight = torch.nn.Parameter(
            torch.empty(0)
        )  # what a lost or mis-shaped tensor does to every call
        assert chat(server.url).status_code == 500
        broken = health(server.url)
        assert broken["code"] == 503 and broken["status"] == "error" and broken["failed_batches"] == 1, broken
        assert broken["error"], broken
        head.weight = weight
        assert chat(server.url).status_code == 200
        assert health(server.url)["code"] == 200


def test_bad_requests_through_the_api_fail_alone_in_steady_traffic(server: ServerThread) -> None:
    """The issue's two requests among valid ones sent at once: a lone surrogate in the text is a 400 for that
    request; temperature 1e-300 is answered (greedily, documented); every valid request gets its answer."""
    calls = [{}] * 6 + [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "\ud800x"},
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                    ],
                }
            ]
        },
        {"temperature": 1e-300},
    ]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        codes = [r.status_code for r in pool.map(lambda change: chat(server.url, **change), calls)]
    assert codes == [200] * 6 + [400, 200]
    assert health(server.url)["code"] == 200


def test_the_real_server_answers_every_client_but_the_bad_one(lora_run: Path) -> None:
    """Issue 20, case 1 as a user meets it: `phivision serve` started as users start it, steady clients on the
    official `openai` client, and one bad request a second among them (temperature 1e-300 through the client; a
    lone surrogate as the JSON escape, which the client itself cannot encode). Every good request is answered,
    the surrogate gets an OpenAI-style 400 naming the field, 1e-300 is answered greedily, and /healthz never
    says 503 (a load balancer keeps the node). Reverted, a bad request's batch fails whole and health turns 503."""
    import openai

    flags = ["--served-model-name", "tiny", "--max-new-tokens", "4", "--no-constrain", "--max-wait-ms", "200"]
    with ServeProcess(lora_run, *flags) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        image = [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]

        def ask(**change) -> str:
            messages = [{"role": "user", "content": image}]
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **change)
            return reply.choices[0].finish_reason

        lone_surrogate = {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800x"}, *image]}],
        }
        # alone on an idle server first: the case where health used to turn 503 for 90 s
        refused = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=json.dumps(lone_surrogate),  # ensure_ascii: the surrogate travels as an escape
            headers={"content-type": "application/json"},
            timeout=120,
        )
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
        assert refused.json()["error"]["param"].startswith("messages"), refused.json()
        assert ask(temperature=1e-300) in {"stop", "length"}
        assert health(server.url)["code"] == 200

        stop = time.monotonic() + 12
        healths: list[int] = []

        def steady(_: int) -> list[str]:
            answers = []
            while time.monotonic() < stop:
                answers.append(ask())
            return answers

        def hostile() -> list[int]:
            codes = []
            while time.monotonic() < stop:
                if len(codes) % 2:
                    codes.append(
                        httpx.post(
                            f"{server.url}/v1/chat/completions",
                            content=json.dumps(lone_surrogate),
                            headers={"content-type": "application/json"},
                            timeout=120,
                        ).status_code
                    )
                else:
                    codes.append(200 if ask(temperature=1e-300) else 0)
                healths.append(health(server.url)["code"])
                time.sleep(1.0)
            return codes

        with ThreadPoolExecutor(max_workers=7) as pool:
            steady_runs = [pool.submit(steady, i) for i in range(6)]
            bad_codes = pool.submit(hostile).result()
            answered = [answer for run in steady_runs for answer in run.result()]
        final = health(server.url)
    assert len(answered) >= 12 and set(answered) <= {"stop", "length"}  # every good request answered
    assert bad_codes[0::2] == [200] * len(bad_codes[0::2]) and bad_codes[1::2] == [400] * len(bad_codes[1::2])
    assert len(bad_codes) >= 4 and set(healths) == {200} and final["code"] == 200
    assert final["failed_batches"] == 0


# ------------------------------------------------------------------------ case 8: the image format allowlist

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke showpage\n"


def test_uploads_in_formats_outside_the_allowlist_never_reach_their_decoder(
    lora_run: Path, tmp_path: Path
) -> None:
    """An EPS upload would reach Pillow's Ghostscript path. The server runs with a `gs` on its PATH that leaves a
    mark when run (Pillow calls it by that name): EPS and ICO, uploaded to /v1/predict or sent as a chat's
    data: URL, are refused with their format named, and Ghostscript never runs."""
    import io

    from PIL import Image

    mark = tmp_path / "ghostscript-ran"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "gs").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (tmp_path / "bin" / "gs").chmod(0o755)
    icon = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(icon, format="ICO")
    path = f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}"
    flags = ["--served-model-name", "tiny", "--max-new-tokens", "4", "--no-constrain"]
    with ServeProcess(lora_run, *flags, env={"PATH": path}) as server:
        for name, data in (("EPS", EPS), ("ICO", icon.getvalue())):
            upload = httpx.post(
                f"{server.url}/v1/predict", files={"image": ("photo.png", data, "image/png")}, timeout=120
            )
            assert upload.status_code == 415, upload.text
            assert "unsupported_format" in upload.json()["detail"] and name in upload.json()["detail"]
            body = {
                "model": "tiny",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}}]}
                ],
            }
            reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
            assert reply.status_code == 400 and name in reply.json()["error"]["message"], reply.text
        assert health(server.url)["code"] == 200
    assert not mark.exists(), "Ghostscript ran"


# ------------------------------------------------------------------------------ case 3: slow and many clients


class GuardedServer(ServerThread):
    """The app under the uvicorn configuration `phivision serve` uses (serve.guard.server_config)."""

    def __init__(self, app, **bounds) -> None:
        import threading

        import uvicorn

        from phivision.serve.guard import server_config

        super().__init__(app)
        limits = ServeLimits(**bounds).validate()
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, limits, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing ``sock`` (None if it kept it open for ``within`` seconds)."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except OSError:
        pass
    return received


def test_headers_that_trickle_are_cut_off_and_health_still_answers(loaded: LoadedModel) -> None:
    with GuardedServer(create_app(loaded, LIMITS, model_name="tiny"), header_timeout=1.0) as server:
        tricklers = []
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            tricklers.append(sock)
        idle = socket.create_connection(("127.0.0.1", server.port))  # connects and sends nothing
        assert health(server.url)["code"] == 200  # answered while 31 connections hold no complete request
        for sock in tricklers[:5]:
            sock.sendall(b"a")  # still trickling: bytes keep coming, the headers never end
        replies = [_closed_by_server(sock, within=30) for sock in tricklers]
        assert all(r is not None and r.startswith(b"HTTP/1.1 408") for r in replies), replies[:3]
        assert _closed_by_server(idle, within=30) == b""  # nothing sent: closed without a reply
        for sock in [*tricklers, idle]:
            sock.close()


def test_a_slow_body_is_not_cut_by_the_header_deadline(loaded: LoadedModel) -> None:
    """The header deadline ends when the headers are in; the body has --body-timeout (60 s here)."""
    with GuardedServer(create_app(loaded, LIMITS, model_name="tiny"), header_timeout=0.5) as server:
        body = json.dumps(
            {
                "model": "tiny",
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}],
                    }
                ],
            }
        ).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        for k in range(4):  # the body in four parts, 0.5 s apart: past the header deadline several times
            sock.sendall(body[k * len(body) // 4 : (k + 1) * len(body) // 4])
            time.sleep(0.5)
        reply = _closed_by_server(sock, within=120)
        sock.close()
    assert reply is not None and reply.startswith(b"HTTP/1.1 200"), reply[:200] if reply else reply


def test_connections_over_the_cap_get_503_at_once_and_are_closed(loaded: LoadedModel) -> None:
    with GuardedServer(
        create_app(loaded, LIMITS, model_name="tiny"), max_connections=8, header_timeout=60.0
    ) as server:
        from phivision.serve.guard import HEALTH_SLOTS

        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
        time.sleep(0.2)  # let the server register them
        assert health(server.url)["code"] == 200  # at the cap, a health probe is still answered
        assert chat(server.url).status_code == 503  # ...and nothing else
        probes = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(HEALTH_SLOTS)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.port))  # past the cap and the probe slots
        reply = _closed_by_server(extra, within=30)
        assert reply is not None and reply.startswith(b"HTTP/1.1 503"), reply
        assert all(_closed_by_server(sock, within=30) == b"" for sock in probes)  # silent probes: closed soon
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert chat(server.url).status_code == 200  # room again


def test_a_flood_of_bad_requests_writes_a_bounded_log(loaded: LoadedModel) -> None:
    """400 malformed requests in a burst: uvicorn would log a warning for each; the log budget lets through at
    most its burst plus its rate, and says how many lines it left out."""
    import logging

    from phivision.serve.guard import LogBudget

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with GuardedServer(create_app(loaded, LIMITS, model_name="tiny")) as server:
            start = time.monotonic()
            for _ in range(400):
                with socket.create_connection(("127.0.0.1", server.port)) as sock:
                    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                    _closed_by_server(sock, within=10)
            elapsed = time.monotonic() - start
            budget = next(f for f in logging.getLogger("uvicorn.error").filters if isinstance(f, LogBudget))
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    invalid = [m for m in seen if "Invalid HTTP request" in m]
    assert len(invalid) <= budget.burst + budget.per_second * elapsed + 1, len(invalid)
    assert len(invalid) < 400  # some were left out...
    assert any("left out" in m for m in seen) or budget.dropped  # ...and the log says so (or will, next line)


# ------------------------------------------------------------------- case 11: stalled remote images


def test_stalled_remote_images_do_not_delay_a_data_url_request(loaded: LoadedModel) -> None:
    """45 chats whose image URL points at a host that accepts and never answers, then one with a data: URL:
    the data: request is answered while every stalled one is still waiting (fetches hold no thread; at most
    --max-remote-fetches run, the rest wait for a slot and end with the fetch timeout, never hang)."""
    import threading

    from phivision.netguard import AddressPolicy

    limits = ServeLimits(max_new_tokens=4, constrain=False, remote_image_timeout=8.0, max_remote_fetches=12)
    app = create_app(loaded, limits, model_name="tiny", remote_images=AddressPolicy(allow_private=False))
    finished: list[tuple[str, int]] = []
    with silent_host() as (port, held), ServerThread(app) as server:

        def remote(k: int) -> None:
            content = [{"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/photo.png?{k}"}}]
            body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
            code = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).status_code
            finished.append(("remote", code))

        threads = [threading.Thread(target=remote, args=(k,)) for k in range(45)]
        for thread in threads:
            thread.start()
        while len(held) < 12:  # every fetch slot is stalled on the silent host
            time.sleep(0.05)
        finished.append(("data", chat(server.url).status_code))
        fetching = len(held)  # connections the server opened to the silent host so far
        for thread in threads:
            thread.join()
    assert finished[0] == ("data", 200)  # answered before any stalled request came back
    codes = sorted(code for kind, code in finished if kind == "remote")
    assert set(codes) <= {400, 503} and len(codes) == 45  # each one ended: timeout (400) or no slot (503)
    assert fetching == 12  # while the slots were stalled, no more fetches were started
