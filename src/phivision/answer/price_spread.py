"""The model's own uncertainty about the price it writes, read from the one constrained answer it gives.

While a constrained answer is generated, the steps that may write price characters (from the last token of the
fixed text before the price to the token that ends the price) record the model's probabilities over the tokens
the template allows there. Afterwards each recorded alternative is read as the price it would have begun: the
answer's price characters up to that step, then the alternative's. A number the alternative leaves open keeps
the answer's own remaining integer digits (the same magnitude); one it closes (a decimal point, the text after
the price, the stop token) ends there. Weighted by the chance of leaving the answer's path at that step (the
answer's own token probabilities before it, times the alternative's), these prices and the answer's own form a
distribution whose weights sum to one, up to the alternatives left out (each less likely than 1 in 100,000):
the leading digits and the number of digits the model hesitated over, whatever the tokenizer's digit pieces
(``▁89`` ``0.0`` or ``8`` ``9`` ``0``). Its mean absolute log-distance from the answer's price is the answer's
**spread**, which :mod:`phivision.answer.calibration` turns into a price range with measured coverage.

No extra forward pass: the scores are the ones the answer was generated from; the cost is the grammar's full
mask at the few price steps (chosen by measurement against sampled answers: benchmarks/bench_intervals.py).
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_ALTERNATIVES = 1024  # tokens kept per recorded step, most probable first (a price step allows far fewer)
MIN_WEIGHT = (
    1e-5  # alternatives less likely than this are left out of the distribution (their mass with them)
)
_NUMBER = re.compile(rb"[0-9]*(?:\.[0-9]*)?")
_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # guide -> token id -> bytes
_PRICE = re.compile(rb"[0-9]+(?:\.[0-9]+)?")


@dataclass(frozen=True)
class PriceDistribution:
    """Prices the model could have written instead of ``price``, with their probabilities (``price`` first)."""

    price: float  # the answer's own price
    values: tuple[float, ...]
    weights: tuple[float, ...]  # sum to at most 1: alternatives beyond MAX_ALTERNATIVES are left out

    @property
    def spread(self) -> float:
        """Weighted mean of ``|ln(value / price)|``: 0 when the model is sure of every price token."""
        values, weights = np.asarray(self.values), np.asarray(self.weights)
        total = weights.sum()
        if total <= 0:
            return 0.0
        return float((weights * np.abs(np.log(values / self.price))).sum() / total)


class PriceSteps:
    """For one ``generate`` call: per batch row, the allowed tokens' probabilities at each step that may write the
    price. :class:`phivision.answer.constrain.ConstrainedLogits` calls :meth:`wants` and :meth:`record`; the
    generation loop then asks :meth:`distribution` for each row's finished answer."""

    def __init__(self, guide: Any, batch_size: int) -> None:
        self.guide = guide
        index = guide.fields.index("full_price")
        self.first_field = len(guide.lead.encode()) + len(guide.literals[0])
        before = (guide.lead.encode() if index == 0 else b"") + guide.literals[index]
        # The fixed text before the price without its trailing space (which tokenizers write with the number).
        self.marker = before.rstrip()
        self.index = index
        self.steps: list[dict[int, tuple[list[int], list[float]]]] = [{} for _ in range(batch_size)]
        self.texts = [b""] * batch_size  # each row's answer so far, decoded a token at a time
        self.decoded = [0] * batch_size

    def wants(self, row: int, tokens: list[int]) -> bool:
        """Whether row ``row``'s next token may write price characters (``tokens``: its answer so far): the fixed
        text before the price is there (but for its trailing space), and nothing but price characters since.
        Conservative: :meth:`distribution` keeps only the steps that did write the price."""
        if len(tokens) > self.decoded[row]:
            self.texts[row] += self.guide.tokenizer.decode_bytes(tokens[self.decoded[row] :])
            self.decoded[row] = len(tokens)
        text = self.texts[row]
        at = text.rfind(self.marker) if self.marker else 0
        if at < 0:
            return False
        rest = text[at + len(self.marker) :].lstrip()
        return _NUMBER.match(rest).end() == len(rest)

    def record(self, row: int, step: int, scores: torch.Tensor, allowed: torch.Tensor) -> None:
        """Keep the model's probabilities over the ``allowed`` tokens at this step (``scores``: one row of logits)."""
        logp = torch.log_softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1)
        count = min(int(allowed.sum()), MAX_ALTERNATIVES)
        top = torch.topk(logp, count)
        self.steps[row][step] = (top.indices.tolist(), top.values.exp().tolist())

    def token_bytes(self, token: int) -> bytes:
        """A token's text as bytes, decoded once per guide (answers share their tokenizer's pieces)."""
        known = _TOKEN_BYTES.setdefault(self.guide, {})
        if token not in known:
            known[token] = self.guide.tokenizer.decode_bytes([token])
        return known[token]

    def price_span(self, text: bytes) -> tuple[int, int] | None:
        """Where the price is in an answer's bytes (start, end), following the template's fixed text."""
        pos = self.first_field
        for i in range(self.index):
            found = text.find(self.guide.literals[i + 1], pos)
            if found < 0:
                return None
            pos = found + len(self.guide.literals[i + 1])
        match = _PRICE.match(text, pos)
        return (pos, match.end()) if match else None

    def distribution(self, row: int, tokens: list[int], stop_ids: set[int]) -> PriceDistribution | None:
        """The first-deviation price distribution of one finished answer (``tokens``: the generated ids, up to and
        including the first stop token); None when the answer has no readable price or nothing was recorded."""
        pieces = [b"" if t in stop_ids else self.token_bytes(t) for t in tokens]
        text = b"".join(pieces)
        span = self.price_span(text)
        if span is None or not self.steps[row]:
            return None
        start, end = span
        written = text[start:end]
        price = float(written)
        if not price > 0:
            return None
        values, weights = [], []
        stay = 1.0  # the chance of following the answer's own tokens up to this step
        offset = 0
        for step, (token, piece) in enumerate(zip(tokens, pieces, strict=True)):
            begin, offset = offset, offset + len(piece)
            recorded = self.steps[row].get(step)
            if recorded is None:
                if offset <= start:
                    continue  # fixed text before the price
                break
            own = 0.0
            for alternative, p in zip(*recorded, strict=True):
                if alternative == token:
                    own = p
                    continue
                if stay * p < MIN_WEIGHT:
                    continue
                stop = alternative in stop_ids
                head = text[:begin] + (b"" if stop else self.token_bytes(alternative))
                value = _deviated_price(head[start:], stop, written)
                if value is not None:
                    values.append(value)
                    weights.append(stay * p)
            stay *= own
            if offset > end or begin >= end:
                break  # the step that closed the price
        return PriceDistribution(price, (price, *values), (stay, *weights))


def _deviated_price(chars: bytes, stopped: bool, answer: bytes) -> float | None:
    """The price an answer would hold whose price text starts with ``chars`` (``answer``: the written price)."""
    number = _NUMBER.match(chars).group()
    closed = stopped or len(number) < len(chars)  # something other than a price character follows
    whole, dot, _ = number.partition(b".")
    if not whole:
        return None if closed else float(answer)  # nothing of the price written yet: the answer's own
    if whole.startswith(b"0") and not dot:
        return None  # a leading 0 is a price below 1 whose digits are not written yet
    if not (dot or closed):
        own = answer.partition(b".")[0]
        whole += own[len(whole) :]  # still open: the same magnitude as the answer's
        value = float(whole)
    else:
        value = float(number.rstrip(b"."))
    return value if value > 0 and math.isfinite(value) else None
