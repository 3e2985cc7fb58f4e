"""The price distribution read from a constrained answer, against a scripted model whose distribution is given."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from phivision.answer.calibration import calibrate, coverage
from phivision.answer.constrain import AnswerConstraint
from phivision.answer.generate import generate_completions
from phivision.answer.price_spread import _deviated_price
from phivision.answer.prompt import PromptFormat, parse_answer
from phivision.runs import load_model

ANSWER = "Product: Tote, Category: bags, Full Price: 890.0"
# At the price's first token the scripted model hesitates: "▁89" (-> 890.0), "▁4" and "▁129".
FIRST_PRICE_TOKENS = {"▁89": 0.5, "▁4": 0.3, "▁129": 0.2}
# "▁4" keeps the answer's magnitude (three integer digits): 490; "▁129" has them all: 129.
EXPECTED = {890.0: 0.5, 490.0: 0.3, 129.0: 0.2}


class DistributionHead(torch.nn.Module):
    """Stands in for ``lm_head``: forward call k (generation step k) gives the probabilities ``steps[k]``."""

    def __init__(self, vocab_size: int, steps: list[dict[int, float]]) -> None:
        super().__init__()
        self.vocab_size, self.steps, self.calls = vocab_size, steps, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        probabilities = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        logits = torch.full((*hidden.shape[:2], self.vocab_size), -60.0)
        for token, p in probabilities.items():
            logits[..., token] = math.log(p)
        return logits


@pytest.fixture()
def scripted(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, device="cpu")
    tokenizer = loaded.processor.tokenizer
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert "▁89" in pieces, pieces  # the tiny tokenizer writes the price as ▁89 0.0
    alternatives = {tokenizer.convert_tokens_to_ids(t): p for t, p in FIRST_PRICE_TOKENS.items()}
    assert tokenizer.unk_token_id not in alternatives
    steps = [{token: 1.0} for token in ids] + [{loaded.processor.stop_token_ids[0]: 1.0}]
    steps[pieces.index("▁89")] = alternatives
    loaded.model.lm_head = DistributionHead(loaded.model.config.vocab_size, steps)
    return loaded


def answer(loaded, n: int = 1, **kwargs):
    fmt = PromptFormat()
    return generate_completions(
        loaded.model,
        loaded.processor,
        [Image.new("RGB", (64, 64), (200, 30, 30))] * n,
        fmt,
        batch_size=n,
        progress=False,
        constraint=AnswerConstraint(fmt, ("bags", "shirts")),
        **kwargs,
    )


def test_the_distribution_is_the_scripted_one(scripted) -> None:
    (completion,) = answer(scripted, price_spread=True)
    assert completion.text == ANSWER
    distribution = completion.price_distribution
    assert distribution.price == 890.0 and distribution.values[0] == 890.0
    found: dict[float, float] = {}
    for value, weight in zip(distribution.values, distribution.weights, strict=True):
        found[value] = found.get(value, 0.0) + weight
    assert {v: w for v, w in found.items() if w > 1e-9} == pytest.approx(EXPECTED, abs=1e-6)
    expected = 0.3 * abs(math.log(490 / 890)) + 0.2 * abs(math.log(129 / 890))
    assert distribution.spread == pytest.approx(expected, rel=1e-5)


def test_recording_changes_no_answer_and_every_row_gets_its_own(scripted) -> None:
    completions = answer(scripted, n=3, price_spread=True)
    assert [c.text for c in completions] == [ANSWER] * 3
    assert all(c.price_distribution.spread == completions[0].price_distribution.spread for c in completions)
    assert answer(scripted)[0].price_distribution is None  # not asked for: nothing recorded


def test_without_a_constraint_there_is_no_distribution(scripted) -> None:
    fmt = PromptFormat()
    (completion,) = generate_completions(
        scripted.model,
        scripted.processor,
        [Image.new("RGB", (64, 64))],
        fmt,
        progress=False,
        price_spread=True,
    )
    assert completion.price_distribution is None


def test_ranges_from_the_scripted_model_cover_as_its_distribution_says(scripted) -> None:
    """True prices drawn from the model's own distribution: the coverage of each level is known exactly."""
    (completion,) = answer(scripted, price_spread=True)
    price = parse_answer(completion.text).price
    spread = completion.price_distribution.spread
    rng = np.random.default_rng(0)
    values, weights = list(EXPECTED), list(EXPECTED.values())
    calibration_truth = rng.choice(values, size=5000, p=weights)
    calibration = calibrate(calibration_truth, [price] * 5000, [spread] * 5000)
    truth = rng.choice(values, size=20_000, p=weights)
    # 0.4: only 890 (probability 0.5); 0.7: 890 and 490 (0.8); 0.9: all three (1.0)
    for level, expected in ((0.4, 0.5), (0.7, 0.8), (0.9, 1.0)):
        low, high = calibration.intervals([price] * len(truth), [spread] * len(truth), level)
        covered, _ = coverage(truth, low, high)
        assert covered.mean() == pytest.approx(expected, abs=0.012), level


@pytest.mark.parametrize(
    ("chars", "stopped", "expected"),
    [
        (b"4", False, 490.0),  # open: the answer's magnitude (890 has three integer digits)
        (b"12", False, 120.0),
        (b"1290", False, 1290.0),  # already longer than the answer: as written
        (b"4", True, 4.0),  # the stop token closes it
        (b"45,", False, 45.0),  # the text after the price closes it
        (b"89.5", False, 89.5),  # a decimal point fixes the magnitude
        (b"89.", False, 89.0),
        (b"", False, 890.0),  # nothing of the price yet: the answer's own
        (b"", True, None),  # stopped before any digit: no price
        (b"0", False, None),  # below 1, digits unknown: left out
        (b"0.5", True, 0.5),
    ],
)
def test_an_alternative_is_read_as_the_price_it_begins(chars, stopped, expected) -> None:
    assert _deviated_price(chars, stopped, b"890.0") == expected
