"""generate_answers on the tiny checkpoint: deterministic, batch-invariant, in input order, stops where it should."""

from __future__ import annotations

import pytest
from eval_helpers import ScriptedHead
from PIL import Image

from phivision.answer.generate import generate_answers
from phivision.runs import load_model

# Different sizes give different image-token counts, so batches mix prompt lengths and get left padding.
SIZES = [(64, 64), (200, 50), (50, 300), (120, 90), (80, 80), (300, 40), (90, 150)]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    colors = [
        (200, 30, 30),
        (30, 200, 30),
        (30, 30, 200),
        (220, 220, 40),
        (10, 10, 10),
        (250, 250, 250),
        (120, 60, 180),
    ]
    return [Image.new("RGB", size, color) for size, color in zip(SIZES, colors, strict=True)]


def answer(loaded, images, **kwargs) -> list[str]:
    kwargs.setdefault("max_new_tokens", 8)
    return generate_answers(loaded.model, loaded.processor, images, loaded.prompt, progress=False, **kwargs)


def test_batched_equals_one_at_a_time_and_keeps_order(loaded, images) -> None:
    lengths = {loaded.processor.image_processor.calc_num_image_tokens(*im.size) for im in images}
    assert len(lengths) > 2  # the batch really mixes prompt lengths
    batched = answer(loaded, images, batch_size=3)
    single = [answer(loaded, [im], batch_size=1)[0] for im in images]
    assert batched == single
    assert len(set(batched)) > 1  # answers differ by image, so a reordering would be caught
    reversed_answers = answer(loaded, images[::-1], batch_size=4)
    assert reversed_answers == batched[::-1]


def test_deterministic(loaded, images) -> None:
    assert answer(loaded, images, batch_size=8) == answer(loaded, images, batch_size=8)


def test_empty_input_and_bad_batch_size(loaded) -> None:
    assert answer(loaded, []) == []
    with pytest.raises(ValueError, match="batch_size"):
        answer(loaded, [Image.new("RGB", (32, 32))], batch_size=0)


@pytest.mark.parametrize("max_new_tokens", [2, 20])
def test_decodes_only_new_tokens_and_stops_at_stop_tokens(tiny_checkpoint, images, max_new_tokens) -> None:
    loaded = load_model(tiny_checkpoint, device="cpu")
    tokenizer = loaded.processor.tokenizer
    words = tokenizer("Red Bag", add_special_tokens=False)["input_ids"]
    junk = tokenizer(" never shown", add_special_tokens=False)["input_ids"]
    script = words + [loaded.processor.stop_token_ids[0]] + junk
    loaded.model.lm_head = ScriptedHead(loaded.model.config.vocab_size, script)
    loaded.model.train()
    answers = answer(loaded, images[:3], batch_size=3, max_new_tokens=max_new_tokens)
    expected = tokenizer.decode(words[:max_new_tokens], skip_special_tokens=True).strip()
    assert answers == [expected] * 3
    assert "Red" in expected
    assert loaded.model.training  # the caller's mode is restored (training calls this between steps)
