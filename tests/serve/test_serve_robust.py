"""Issue 20: one bad request fails alone, and the server survives slow and flooding clients. A real tiny model
behind real uvicorn servers on loopback; raw sockets for slow clients, the official client for chats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServerThread, data_url, png_bytes

from phivision.runs import LoadedModel, load_model
from phivision.serve.server import Generation, RequestFailed, ServeLimits, create_app

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
