"""Batched greedy answers for product photos: the one generation loop used by evaluate, training, predict and serve.

Prompts are left-padded so every row's next token sits in the last column and the KV cache grows in step. Images
are sorted by their image-token count before batching, so a batch holds prompts of similar length (little
padding), and the answers are returned in the caller's order. With a ``constraint`` every answer follows the run's
template (see :mod:`phivision.evaluate.constrain`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessorList

from phivision.data.images import ImageError, load_image
from phivision.evaluate.constrain import AnswerConstraint
from phivision.prompt import PromptFormat, prompt_text


def expected_length(processor: Any, image: Image.Image) -> int:
    """Image tokens the processor will emit for ``image`` (arithmetic on the size only)."""
    return processor.image_processor.calc_num_image_tokens(image.width, image.height)


def _first_stop(row: list[int], stop_ids: set[int]) -> list[int]:
    """The generated ids up to (not including) the first stop token."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[:i]
    return row


# no_grad rather than inference_mode: training calls this between steps, and a buffer created lazily under
# inference_mode (e.g. a rotary cache) would later break backward with "inference tensors cannot be saved".
@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    prompt: PromptFormat = PromptFormat(),
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool | tqdm = True,
    constraint: AnswerConstraint | None = None,
) -> list[str]:
    """Greedy answers, one per image, in the order of ``images``.

    Args:
        model: a Phi3VForCausalLM (or a PEFT wrapper of one); put in eval mode for the call, then restored.
        processor: the matching Phi3VProcessor (its ``stop_token_ids`` end an answer).
        images: RGB PIL images (load them with ``phivision.data.images.load_image``).
        prompt: the prompt format the model was trained with.
        batch_size: prompts per forward pass.
        max_new_tokens: answer length cap; an answer that reaches it is returned as is (and may not parse).
        progress: show a tqdm bar; or an open tqdm bar to advance (a caller answering in chunks keeps one bar).
        constraint: force every answer into this template and label space (None: free generation). A
            ``max_new_tokens`` too small for the template's fixed text, longest category and a price is raised to
            that minimum, so a constrained answer is never cut.

    Returns:
        The decoded new tokens of each answer, special tokens skipped, surrounding whitespace stripped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not images:
        return []
    stop_ids = [int(t) for t in processor.stop_token_ids]
    stops = set(stop_ids)
    guide = None
    if constraint is not None:
        from phivision.evaluate.constrain import answer_guide, effective_max_new_tokens

        guide = answer_guide(processor.tokenizer, constraint, model.config.vocab_size, stop_ids[0])
        max_new_tokens = effective_max_new_tokens(guide, max_new_tokens)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=stop_ids,
        pad_token_id=processor.pad_token_id,
    )
    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    text = prompt_text(prompt)
    # Longest first: similar lengths share a batch, and a batch that does not fit in memory fails at once.
    order = sorted(range(len(images)), key=lambda i: -expected_length(processor, images[i]))
    answers = [""] * len(images)
    own_bar = isinstance(progress, bool)
    bar = tqdm(total=len(images), desc="generate", unit="img", disable=not progress) if own_bar else progress
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = processor(
                text=[text] * len(chunk),
                images=[images[i] for i in chunk],
                padding_side="left",
                return_tensors="pt",
            )
            inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            if guide is not None:  # a fresh processor per batch: it holds one grammar state per row
                inputs["logits_processor"] = LogitsProcessorList(
                    [guide.logits_processor(len(chunk), max_new_tokens)]
                )
            output = model.generate(**inputs, generation_config=config)  # (b, prompt + new)
            new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
            texts = processor.tokenizer.batch_decode(
                [_first_stop(r, stops) for r in new_tokens], skip_special_tokens=True
            )
            for i, answer in zip(chunk, texts, strict=True):
                answers[i] = answer.strip()
            bar.update(len(chunk))
    finally:
        model.train(was_training)
        if own_bar:
            bar.close()
    return answers


def answer_image_files(
    loaded: Any,
    paths: Sequence[Path],
    chunk_size: int,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool | tqdm = True,
    constraint: AnswerConstraint | None = None,
) -> Iterator[tuple[Path, str, str | None]]:
    """``(path, answer, error)`` for every image file, in order: the file loop shared by evaluate and predict.

    Images are decoded ``chunk_size`` at a time, so memory stays flat on large folders and results stream out.
    An unreadable file yields ``(path, "", reason)`` instead of stopping the run: one corrupt photo costs that
    photo only. ``loaded`` is a :class:`phivision.runs.LoadedModel`; ``constraint`` as in :func:`generate_answers`.
    """
    own_bar = isinstance(progress, bool)
    bar = tqdm(total=len(paths), desc="generate", unit="img", disable=not progress) if own_bar else progress
    try:
        for start in range(0, len(paths), chunk_size):
            chunk = paths[start : start + chunk_size]
            images, errors = [], []
            for path in chunk:
                try:
                    images.append(load_image(path))
                    errors.append(None)
                except ImageError as err:
                    images.append(None)
                    errors.append(str(err))
            readable = [image for image in images if image is not None]
            answers = iter(
                generate_answers(
                    loaded.model,
                    loaded.processor,
                    readable,
                    prompt=loaded.prompt,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=bar,
                    constraint=constraint,
                )
            )
            bar.update(len(images) - len(readable))
            for path, image, error in zip(chunk, images, errors, strict=True):
                yield path, ("" if image is None else next(answers)), error
    finally:
        if own_bar:
            bar.close()
