"""Constrained answers: at every step the model may only pick tokens that keep its answer inside the run's template.

The answer is one regular language, compiled by llguidance (https://github.com/guidance-ai/llguidance) into a
token mask per step: the template's fixed text, the title as free text (one line, at least one visible character,
never containing the text that follows it, so the answer splits back one way only), the category one of the
training split's categories (free text like the title when the set is unknown), the price a positive number
(up to 9 digits and 2 decimals), then the stop token. A weak or untrained model therefore always produces an
answer that :func:`phivision.answer.prompt.parse_answer` reads completely, and a trained model that already follows the
template is only kept from straying.

Two things go beyond a plain mask:

* Fixed text is forced token by token in the tokenizer's own spelling of it (llguidance's fast-forward tokens),
  which is what a trained model writes anyway and the shortest way for an untrained one.
* The answer always ends inside ``max_new_tokens``: each free-text field has a reserve (the most tokens the rest
  of the answer can take); once the tokens left reach it, the text that closes the field is forced. A budget
  too small for the fixed text, the longest category and a price is raised to that minimum (with a warning).

Only this module imports llguidance.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from phivision.answer.prompt import PromptFormat, answer_template_parts, format_answer

# A positive price as format_price writes it: no leading zeros, at most 9 digits and 2 decimals.
PRICE_REGEX = r"[1-9][0-9]{0,8}(\.[0-9]{1,2})?|0\.(0[1-9]|[1-9][0-9]?)"
PRICE_MAX_CHARS = 12
# Free text: one line without control characters, at least one character the parser does not strip, and never
# anything the parser would take for a special token.
TEXT_REGEX = r"[^\x00-\x1f\x7f]*[^\x00-\x20\x7f,;|][^\x00-\x1f\x7f]*"
SPECIAL_TEXT_REGEX = r"(?s:.*)(<\||<\/?s>)(?s:.*)"  # "/" escaped: it sits inside /.../
FREE_FIELD_MIN_COST = 4  # one character of free text: up to 4 byte tokens
SLACK_TOKENS = 4  # room to finish a multi-byte character before a field can be closed


@dataclass(frozen=True)
class AnswerConstraint:
    """What a constrained answer may be: the run's answer template, with the category from ``categories``.

    ``categories`` None constrains the format only (a bare checkpoint with no recorded label space).
    """

    prompt: PromptFormat = field(default_factory=PromptFormat)
    categories: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.categories is not None:
            categories = tuple(sorted({str(c) for c in self.categories}))
            if not categories or not all(c.strip() and c.isprintable() for c in categories):
                raise ValueError("categories must be non-empty, printable, one-line text")
            object.__setattr__(self, "categories", categories)

    @classmethod
    def for_model(cls, loaded: Any) -> AnswerConstraint:
        """The constraint for a :class:`phivision.runs.LoadedModel`: its prompt and its recorded categories."""
        return cls(loaded.prompt, getattr(loaded, "categories", None))


def constraint_name(constraint: AnswerConstraint | None) -> str:
    """How answers were constrained, as recorded in metrics.json: ``off``, ``format`` or ``categories``."""
    if constraint is None:
        return "off"
    return "format" if constraint.categories is None else "categories"


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def answer_grammar(constraint: AnswerConstraint, lead: str = "") -> str:
    """The llguidance (Lark) grammar of one answer; ``lead`` is text the tokenizer puts before every answer
    (SentencePiece tokenizers write the first word with its leading space)."""
    parts = answer_template_parts(constraint.prompt.answer_template)
    pieces = [_lark_string(lead + parts.literals[0])] if lead + parts.literals[0] else []
    terminals = []
    for i, name in enumerate(parts.fields):
        after = parts.literals[i + 1]
        if name == "full_price":
            terminals.append(f"PRICE: /{PRICE_REGEX}/")
        elif name == "category" and constraint.categories is not None:
            terminals.append("CATEGORY: " + " | ".join(_lark_string(c) for c in constraint.categories))
        else:
            # Free text must not contain the text that closes it, so the answer splits back exactly one way.
            closing = f" & ~(/(?s:.*)/ {_lark_string(after)} /(?s:.*)/)" if after else ""
            terminals.append(f"{name.upper()}: /{TEXT_REGEX}/{closing} & ~/{SPECIAL_TEXT_REGEX}/")
        pieces.append("PRICE" if name == "full_price" else name.upper())
        if after:
            pieces.append(_lark_string(after))
    return "\n".join(["start: ANSWER", "ANSWER: " + " ".join(pieces), *terminals]) + "\n"


def _field_cost(name: str, constraint: AnswerConstraint) -> int:
    """The most tokens a fixed-vocabulary field can take (one byte token per byte); free text: its minimum."""
    if name == "full_price":
        return PRICE_MAX_CHARS
    if name == "category" and constraint.categories is not None:
        return max(len(c.encode()) for c in constraint.categories) + 1  # +1: a leading space of its own
    return FREE_FIELD_MIN_COST


class AnswerGuide:
    """A constraint compiled for one tokenizer: grammar, stop token, closing text and reserve of every free field.

    Building one costs a few milliseconds; :func:`answer_guide` caches them per tokenizer and constraint.
    """

    def __init__(self, tokenizer: Any, constraint: AnswerConstraint, vocab_size: int, stop_id: int) -> None:
        self.constraint, self.stop_id = constraint, int(stop_id)
        self.vocab_size = max(int(vocab_size), len(tokenizer))
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=self.vocab_size, eos_token=self.stop_id
        )
        parts = answer_template_parts(constraint.prompt.answer_template)
        self.lead = self._answer_lead(tokenizer, constraint.prompt)
        self.grammar = answer_grammar(constraint, self.lead)
        self._matcher = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"cannot compile the answer grammar: {self._matcher.get_error()}")

        def canonical(text: str) -> list[int]:
            return list(self.tokenizer.tokenize_str(text)) if text else []

        self.literals = [lit.encode() for lit in parts.literals]
        self.fields = parts.fields
        self.free = [
            name == "title" or (name == "category" and constraint.categories is None) for name in parts.fields
        ]
        # Tokens that close free field i: the whole text after it (free text never contains it, so once it is
        # written the field is over), or None for a last field with nothing after it (closed by the stop token).
        self.closing = [canonical(after) or None for after in parts.literals[1:]]
        costs = [_field_cost(name, constraint) for name in self.fields]
        literal_costs = [len(canonical(lit)) + 1 if lit else 0 for lit in parts.literals]
        # reserve[i]: the most tokens everything after field i can take, stop token and slack included.
        self.reserve = [
            sum(literal_costs[i + 1 :]) + sum(costs[i + 1 :]) + 1 + SLACK_TOKENS
            for i in range(len(self.fields))
        ]
        self.min_new_tokens = len(canonical(self.lead + parts.literals[0])) + costs[0] + self.reserve[0]

    def _answer_lead(self, tokenizer: Any, prompt: PromptFormat) -> str:
        """Whitespace the tokenizer writes before an answer (``▁Product:`` decodes to `` Product:``)."""
        sample = format_answer(prompt, "Check Cotton Shirt", "shirts", 1290.0)
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        decoded = self.tokenizer.decode_bytes(list(ids)).decode("utf-8", errors="replace")
        lead = decoded[: len(decoded) - len(sample)] if decoded.endswith(sample) else ""
        return lead if lead.isspace() else ""

    def new_matcher(self) -> Any:
        return self._matcher.deep_copy()

    def field_index(self, generated: bytes) -> int | None:
        """Which field ``generated`` (the answer so far) is writing: None before the first field, len(fields)
        after the last. Free fields never contain their closing text, so the first occurrence ends them."""
        start = len(self.lead.encode()) + len(self.literals[0])
        if len(generated) < start:
            return None
        pos = start
        for i in range(len(self.fields)):
            after = self.literals[i + 1]
            if not after:
                return i
            found = generated.find(after, pos)
            if found < 0:
                return i
            pos = found + len(after)
        return len(self.fields)

    def logits_processor(
        self, batch_size: int, max_new_tokens: int, sampling: bool = False
    ) -> ConstrainedLogits:
        """A fresh processor for one ``generate`` call over ``batch_size`` rows."""
        return ConstrainedLogits(self, batch_size, max_new_tokens, sampling)


@dataclass
class _Row:
    matcher: Any
    tokens: list[int] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)  # forced tokens still to emit (closing a field)
    done: bool = False


class ConstrainedLogits:
    """A ``generate`` logits processor: masks every token the answer grammar does not allow.

    Called once per step with the whole sequence so far; the first call only sees the prompt, every later call
    first feeds each row's newest token to that row's matcher. Greedy decoding takes the best allowed token, so
    where the model's own best token is allowed it is kept as is and no full mask is computed (a trained model
    that follows the template costs one token check per step). Finished rows (stopped, or broken by a token the
    mask did not allow, e.g. from NaN logits) may only emit the stop token. When ``sampling``, that shortcut
    would make every step greedy, so the full mask is computed and the sampler chooses among the allowed tokens.
    """

    def __init__(
        self, guide: AnswerGuide, batch_size: int, max_new_tokens: int, sampling: bool = False
    ) -> None:
        self.guide, self.max_new_tokens, self.sampling = guide, max_new_tokens, sampling
        self.rows = [_Row(guide.new_matcher()) for _ in range(batch_size)]
        self.prompt_length: int | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        else:
            for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                self._advance(row, int(token))
        left = self.max_new_tokens - (input_ids.shape[1] - self.prompt_length)
        width = scores.shape[-1]
        allowed = np.zeros((len(self.rows), max(width, self.guide.vocab_size)), dtype=bool)
        for i, (row, best) in enumerate(zip(self.rows, scores.argmax(dim=-1).tolist(), strict=True)):
            forced = self._forced(row, left, int(best))
            if forced is not None:
                allowed[i, forced] = True
            else:
                bits = np.frombuffer(row.matcher.compute_bitmask(), dtype=np.uint8)
                mask = np.unpackbits(bits, bitorder="little")[: self.guide.vocab_size].astype(bool)
                allowed[i, : mask.size] = mask
        keep = torch.from_numpy(allowed[:, :width]).to(scores.device)
        return scores.masked_fill(~keep, float("-inf"))

    def _advance(self, row: _Row, token: int) -> None:
        if row.done:
            return
        if row.matcher.is_stopped() or not row.matcher.consume_token(token):
            row.done = True
            return
        row.tokens.append(token)
        if row.queue and row.queue[0] == token:
            row.queue.pop(0)
        else:
            row.queue.clear()

    def _forced(self, row: _Row, left: int, best: int) -> int | None:
        """The one token this row emits now, or None to mask with the grammar and let the model choose.

        Far from the budget the model's own best token is kept whenever the grammar allows it. Near the budget
        (no more tokens left than the template's worst case) fixed text is spelled the tokenizer's way and a
        free-text field is closed once the tokens left reach its reserve.
        """
        guide, matcher = self.guide, row.matcher
        if row.done or matcher.is_stopped() or matcher.is_error():
            row.done = True
            return guide.stop_id
        if row.queue:
            return row.queue[0]
        if left <= guide.min_new_tokens:
            index = guide.field_index(guide.tokenizer.decode_bytes(row.tokens))
            if (
                index is not None
                and index < len(guide.fields)
                and guide.free[index]
                and left <= guide.reserve[index]
            ):
                closing = guide.closing[index]
                if closing is None and matcher.is_accepting():
                    return guide.stop_id
                if closing and matcher.validate_tokens(closing) == len(closing):
                    row.queue = list(closing)
                    return row.queue[0]
            fast_forward = matcher.compute_ff_tokens()
            if fast_forward:
                return int(fast_forward[0])
        if not self.sampling and matcher.validate_tokens([best]) == 1:
            return best
        fast_forward = matcher.compute_ff_tokens()
        return int(fast_forward[0]) if fast_forward else None


_GUIDES: dict[tuple[int, AnswerConstraint, int, int], tuple[Any, AnswerGuide]] = {}


def answer_guide(tokenizer: Any, constraint: AnswerConstraint, vocab_size: int, stop_id: int) -> AnswerGuide:
    """The compiled guide for this tokenizer and constraint, built once per process (a server or a training run
    generates many batches with the same one)."""
    key = (id(tokenizer), constraint, int(vocab_size), int(stop_id))
    cached = _GUIDES.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    guide = AnswerGuide(tokenizer, constraint, vocab_size, stop_id)
    if len(_GUIDES) >= 8:
        _GUIDES.pop(next(iter(_GUIDES)))
    _GUIDES[key] = (tokenizer, guide)
    return guide


def effective_max_new_tokens(guide: AnswerGuide, max_new_tokens: int) -> int:
    """``max_new_tokens``, raised to the least budget that always completes the template (with a warning)."""
    if max_new_tokens >= guide.min_new_tokens:
        return max_new_tokens
    warnings.warn(
        f"max_new_tokens={max_new_tokens} cannot always hold a constrained answer (fixed text, longest category "
        f"and a price need up to {guide.min_new_tokens} tokens): using {guide.min_new_tokens}",
        stacklevel=3,
    )
    return guide.min_new_tokens
