"""Batched greedy answers for product photos: the one generation loop used by evaluate, training, predict and serve.

An item is one product: one photo, or a list of its photos in order (one prompt with ``<|image_1|>`` ...
``<|image_k|>``). Prompts are left-padded so every row's next token sits in the last column and the KV cache grows
in step. Items are sorted by their image-token count before batching, so a batch holds prompts of similar length
(little padding), and the answers are returned in the caller's order. With a ``constraint`` every answer follows
the run's template (see :mod:`phivision.answer.constrain`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from phivision.answer.constrain import AnswerConstraint, answer_guide
from phivision.answer.price_spread import PriceDistribution, PriceSteps
from phivision.answer.prompt import PromptFormat, prompt_text
from phivision.args import Generation
from phivision.data.images import ImageError, load_image

Item = Image.Image | Sequence[Image.Image]  # one product: a photo, or its photos in order


def photos_of(item: Item) -> list[Image.Image]:
    """An item's photos as a list (a single photo is a list of one)."""
    photos = [item] if isinstance(item, Image.Image) else list(item)
    if not photos:
        raise ValueError("an item needs at least one photo")
    return photos


def expected_length(processor: Any, item: Item) -> int:
    """Image tokens the processor will emit for an item's photos (arithmetic on the sizes only)."""
    count = processor.image_processor.calc_num_image_tokens
    return sum(count(image.width, image.height) for image in photos_of(item))


def _first_stop(row: list[int], stop_ids: set[int]) -> list[int]:
    """The generated ids up to (not including) the first stop token."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[:i]
    return row


@dataclass(frozen=True)
class Completion:
    """One generated answer and its token counts (serve reports them as the OpenAI API's ``usage``)."""

    text: str  # the decoded answer, special tokens skipped, surrounding whitespace stripped
    prompt_tokens: int  # prompt length, image tokens included
    completion_tokens: int  # tokens generated, the closing stop token included
    finished: bool  # ended with a stop token (False: cut off at max_new_tokens)
    price_distribution: PriceDistribution | None = (
        None  # with price_spread=True (phivision.answer.price_spread)
    )


class _StepTokens(BaseStreamer):
    """Hands each generation step's new token of every row to ``callback(image_index, token_id)``."""

    def __init__(self, rows: list[int], callback: Callable[[int, int], None]) -> None:
        self.rows = rows
        self.callback = callback
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt ids
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            self.callback(row, int(token))

    def end(self) -> None:
        pass


def generate_answers(
    model: Any,
    processor: Any,
    images: Sequence[Item],
    prompt: PromptFormat = PromptFormat(),
    batch_size: int = Generation.batch_size,
    max_new_tokens: int = Generation.max_new_tokens,
    progress: bool | tqdm = True,
    constraint: AnswerConstraint | None = None,
) -> list[str]:
    """Greedy answers, one per item (a photo or a product's photos), in the order of ``images`` (see
    :func:`generate_completions`)."""
    completions = generate_completions(
        model, processor, images, prompt, batch_size, max_new_tokens, progress, constraint=constraint
    )
    return [completion.text for completion in completions]


# no_grad rather than inference_mode: training calls this between steps, and a buffer created lazily under
# inference_mode (e.g. a rotary cache) would later break backward with "inference tensors cannot be saved".
@torch.no_grad()
def generate_completions(
    model: Any,
    processor: Any,
    images: Sequence[Item],
    prompt: PromptFormat = PromptFormat(),
    batch_size: int = Generation.batch_size,
    max_new_tokens: int = Generation.max_new_tokens,
    progress: bool | tqdm = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_token: Callable[[int, int], None] | None = None,
    constraint: AnswerConstraint | None = None,
    price_spread: bool = False,
) -> list[Completion]:
    """Answers, one per item, in the order of ``images``: greedy unless ``temperature`` > 0.

    Args:
        model: a Phi3VForCausalLM (or a PEFT wrapper of one); put in eval mode for the call, then restored.
        processor: the matching Phi3VProcessor (its ``stop_token_ids`` end an answer).
        images: one item per answer: an RGB PIL image, or a list of a product's photos in order (one prompt with
            one image tag per photo); load them with ``phivision.data.images.load_image``.
        prompt: the prompt format the model was trained with.
        batch_size: prompts per forward pass.
        max_new_tokens: answer length cap, never exceeded; an answer that reaches it is returned as is,
            ``finished`` False (and may not parse).
        progress: show a tqdm bar; or an open tqdm bar to advance (a caller answering in chunks keeps one bar).
        temperature: 0 decodes greedily; above 0 samples with this temperature (and ``top_p``).
        top_p: nucleus sampling mass (sampling only).
        on_token: called as ``on_token(item_index, token_id)`` for every new token as it is generated (rows
            that already stopped keep receiving padding), so a server can stream answers.
        constraint: force every answer into this template and label space (None: free generation). A
            ``max_new_tokens`` below what the template's fixed text, longest category and a price can need stays
            the cap: the answer is the first ``max_new_tokens`` tokens of a complete constrained answer (the
            verbs say so first: :func:`phivision.answer.constrain.short_budget_note`).
        price_spread: with a ``constraint``, also read each answer's price distribution from the scores it was
            generated from (``Completion.price_distribution``; no extra forward pass).

    Returns:
        One :class:`Completion` per item.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not images:
        return []
    stop_ids = [int(t) for t in processor.stop_token_ids]
    stops = set(stop_ids)
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    guide = None
    plan_tokens = max_new_tokens  # the budget the grammar plans the answer for
    if constraint is not None:
        guide = answer_guide(processor.tokenizer, constraint, model.config.vocab_size, stop_ids[0])
        plan_tokens = max(max_new_tokens, guide.min_new_tokens)  # a shorter cap cuts a complete answer
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        **sampling,
        num_beams=1,
        use_cache=True,
        eos_token_id=stop_ids,
        pad_token_id=processor.pad_token_id,
    )
    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    items = [photos_of(item) for item in images]
    # Longest first: similar lengths share a batch, and a batch that does not fit in memory fails at once.
    order = sorted(range(len(items)), key=lambda i: -expected_length(processor, items[i]))
    answers: list[Completion | None] = [None] * len(images)
    own_bar = isinstance(progress, bool)
    bar = tqdm(total=len(images), desc="generate", unit="img", disable=not progress) if own_bar else progress
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = processor(
                text=[prompt_text(prompt, len(items[i])) for i in chunk],
                images=[photo for i in chunk for photo in items[i]],
                padding_side="left",
                return_tensors="pt",
            )
            inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            price_steps = PriceSteps(guide, len(chunk)) if guide is not None and price_spread else None
            if guide is not None:  # a fresh processor per batch: it holds one grammar state per row
                inputs["logits_processor"] = LogitsProcessorList(
                    [guide.logits_processor(len(chunk), plan_tokens, temperature > 0, price_steps)]
                )
            streamer = _StepTokens(chunk, on_token) if on_token is not None else None
            output = model.generate(
                **inputs, generation_config=config, streamer=streamer
            )  # (b, prompt + new)
            new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
            kept = [_first_stop(r, stops) for r in new_tokens]
            texts = processor.tokenizer.batch_decode(kept, skip_special_tokens=True)
            prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
            for row, i in enumerate(chunk):
                finished = len(kept[row]) < len(new_tokens[row])
                answers[i] = Completion(
                    text=texts[row].strip(),
                    prompt_tokens=int(prompt_lengths[row]),
                    completion_tokens=len(kept[row]) + finished,
                    finished=finished,
                    price_distribution=price_steps.distribution(
                        row, new_tokens[row][: len(kept[row]) + finished], stops
                    )
                    if price_steps is not None
                    else None,
                )
            bar.update(len(chunk))
    finally:
        model.train(was_training)
        if own_bar:
            bar.close()
    return answers  # type: ignore[return-value]  (every slot is filled above)


def answer_image_files(
    loaded: Any,
    paths: Sequence[Path | Sequence[Path]],
    chunk_size: int,
    batch_size: int = Generation.batch_size,
    max_new_tokens: int = Generation.max_new_tokens,
    progress: bool | tqdm = True,
    constraint: AnswerConstraint | None = None,
    price_spread: bool = False,
) -> Iterator[tuple[Any, Completion | None, str | None]]:
    """``(item, completion, error)`` for every item, in order: the file loop shared by evaluate and predict. An
    item is one image file, or a product's photo files in order (one prompt for all of them).

    Items are decoded ``chunk_size`` at a time, so memory stays flat on large folders and results stream out.
    An unreadable file never stops the run: a product answers from its readable photos and ``error`` names the
    others (``reason: path: detail``, ``; `` between two); an item with no readable photo yields
    ``(item, None, error)``. ``loaded`` is a :class:`phivision.runs.LoadedModel`; ``constraint`` and
    ``price_spread`` as in :func:`generate_completions`.
    """
    own_bar = isinstance(progress, bool)
    bar = tqdm(total=len(paths), desc="generate", unit="item", disable=not progress) if own_bar else progress
    try:
        for start in range(0, len(paths), chunk_size):
            chunk = paths[start : start + chunk_size]
            items, errors = [], []
            for item in chunk:
                photos, problems = [], []
                for path in [item] if isinstance(item, (str, Path)) else item:
                    try:
                        photos.append(load_image(path))
                    except ImageError as err:
                        problems.append(str(err))  # the reason, then the file
                items.append(photos or None)
                errors.append("; ".join(problems) or None)
            readable = [photos for photos in items if photos is not None]
            answers = iter(
                generate_completions(
                    loaded.model,
                    loaded.processor,
                    readable,
                    prompt=loaded.prompt,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=bar,
                    constraint=constraint,
                    price_spread=price_spread,
                )
            )
            bar.update(len(items) - len(readable))
            for item, photos, error in zip(chunk, items, errors, strict=True):
                yield item, (None if photos is None else next(answers)), error
    finally:
        if own_bar:
            bar.close()
