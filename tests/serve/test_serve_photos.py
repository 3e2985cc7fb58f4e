"""Several photos of one product in one request, against live uvicorn servers on loopback: repeated ``image``
fields on ``/v1/predict`` and several ``image_url`` parts in one message through the official ``openai`` client,
in process and through the real `phivision serve` command on a saved RUN.

The model is taught, in a few training steps, two products that share their first photo and differ only in the
second, so an answer that follows the second photo shows that every photo reaches the prompt, in order.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from PIL import Image
from serve_helpers import ServeProcess, ServerThread, data_url, png_bytes, teach_answers

from phivision.data.layout import RunLayout
from phivision.runs import LoadedModel
from phivision.serve.server import ServeLimits, create_app

NAME = "phivision-tiny"
FRONT = png_bytes(size=(80, 64), color=(120, 120, 120))
LEATHER = png_bytes(size=(64, 64), color=(100, 55, 15))
SILK = png_bytes(size=(72, 56), color=(225, 175, 30))
LEATHER_ANSWER = "Product: Leather Tote, Category: bags, Full Price: 1440.0"
SILK_ANSWER = "Product: Silk Scarf, Category: scarves, Full Price: 1980.0"
LIMITS = ServeLimits(max_batch_size=4, max_upload_mb=0.25, max_new_tokens=48)


def photo(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def taught(tiny_checkpoint: Path) -> LoadedModel:
    examples = [([photo(FRONT), photo(LEATHER)], LEATHER_ANSWER), ([photo(FRONT), photo(SILK)], SILK_ANSWER)]
    return teach_answers(Path(tiny_checkpoint), examples, steps=80, max_images=2)


@pytest.fixture(scope="module")
def server(taught: LoadedModel) -> Iterator[ServerThread]:
    with ServerThread(create_app(taught, LIMITS, model_name=NAME)) as running:
        yield running


def upload(server: ServerThread | ServeProcess, *photos: tuple[str, bytes]) -> httpx.Response:
    files = [("image", (name, data, "image/png")) for name, data in photos]
    return httpx.post(f"{server.url}/v1/predict", files=files, timeout=120)


def test_predict_takes_repeated_image_fields(server: ServerThread) -> None:
    leather = upload(server, ("front.png", FRONT), ("detail.png", LEATHER))
    assert leather.status_code == 200, leather.text
    assert leather.json()["answer"] == LEATHER_ANSWER
    assert leather.json()["images"] == ["front.png", "detail.png"] and leather.json()["image"] == "front.png"
    silk = upload(server, ("front.png", FRONT), ("detail.png", SILK)).json()
    assert (silk["title"], silk["category"], silk["price"]) == ("Silk Scarf", "scarves", 1980.0)
    one = upload(server, ("front.png", FRONT)).json()
    assert "images" not in one and one["image"] == "front.png"  # one photo: the single-photo record

    too_many = upload(server, ("a.png", FRONT), ("b.png", LEATHER), ("c.png", SILK))
    assert too_many.status_code == 400 and "at most 2 photo(s)" in too_many.json()["detail"]
    broken = upload(server, ("front.png", FRONT), ("cut.png", LEATHER[:60]))
    assert broken.status_code == 415 and broken.json()["detail"].startswith("cut.png: ")


def chat(client: openai.OpenAI, *photos: bytes, stream: bool = False, **extra):
    content = [{"type": "image_url", "image_url": {"url": data_url(data)}} for data in photos]
    return client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": content}], stream=stream, **extra
    )


def test_chat_takes_several_image_url_parts_in_order(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert chat(client, FRONT, LEATHER).choices[0].message.content == LEATHER_ANSWER
    assert chat(client, FRONT, SILK).choices[0].message.content == SILK_ANSWER
    streamed = "".join(
        c.choices[0].delta.content or "" for c in chat(client, FRONT, SILK, stream=True) if c.choices
    )
    assert streamed == SILK_ANSWER
    fields = json.loads(
        chat(client, FRONT, LEATHER, response_format={"type": "json_object"}).choices[0].message.content
    )
    assert (fields["title"], fields["category"], fields["price"]) == ("Leather Tote", "bags", 1440.0)

    with pytest.raises(openai.BadRequestError) as err:
        chat(client, FRONT, LEATHER, SILK)
    assert err.value.code == "too_many_images" and "at most 2" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, FRONT, LEATHER[:60])
    assert err.value.param == "messages[0].content[1].image_url" and err.value.code == "invalid_image"


def test_the_serve_command_answers_from_several_photos(
    taught: LoadedModel, tiny_checkpoint: Path, tmp_path
) -> None:
    """The taught model saved as a full fine-tune with data.max_images 2, served by `phivision serve`: the photos
    of both requests reach one prompt in order, and the limit comes from the RUN's config."""
    run = RunLayout(tmp_path / "run")
    taught.model.save_pretrained(run.model)
    taught.processor.save_pretrained(run.processor)
    config = {
        "model": str(tiny_checkpoint),
        "method": "full",
        "prompt": taught.prompt.to_dict(),
        "data": {"max_images": 2},
    }
    run.config.write_text(yaml.safe_dump(config, sort_keys=False))

    with ServeProcess(run.root, "--served-model-name", NAME, "--max-new-tokens", "48") as serve:
        silk = upload(serve, ("front.png", FRONT), ("detail.png", SILK)).json()
        assert silk["answer"] == SILK_ANSWER and silk["images"] == ["front.png", "detail.png"]
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert chat(client, FRONT, LEATHER).choices[0].message.content == LEATHER_ANSWER
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, FRONT, LEATHER, SILK)
        assert err.value.code == "too_many_images"
