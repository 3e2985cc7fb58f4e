"""`phivision predict`: answer for image files and directories, one JSON line per image.

Unreadable images get a line with an ``error`` field instead of stopping the batch: one corrupt photo in a
folder of thousands should cost that photo, not the run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from phivision.answer.calibration import DEFAULT_LEVEL, PriceRange
from phivision.answer.ranges import answer_range, check_price_level
from phivision.errors import PhivisionError
from phivision.io import atomic_write_text
from phivision.prompt import PromptFormat, parse_answer
from phivision.runs import LoadedModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory becomes its image files (by suffix, sorted, not recursive).

    A path that does not exist, or a directory without images, is a typo worth stopping for before the model
    loads, so it raises PhivisionError.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PhivisionError(
                    f"{path}: directory has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise PhivisionError(f"{path}: no such file or directory")
    if not paths:
        raise PhivisionError("no images given")
    return paths


def prediction_record(
    image: str,
    answer: str,
    prompt: PromptFormat = PromptFormat(),
    currency: str | None = None,
    price_range: PriceRange | None = None,
) -> dict:
    """The JSON shape shared by predict and the HTTP API: the fields parsed with the run's ``prompt`` template,
    the price's ``currency`` (the catalog's, None when the model does not record one), its calibrated range
    (``price_low``, ``price_high`` at ``price_level``; null without a calibration) and the raw answer."""
    parsed = parse_answer(answer, prompt)
    has_range = price_range is not None and price_range.low is not None
    return {
        "image": image,
        "title": parsed.title,
        "category": parsed.category,
        "price": parsed.price,
        "price_low": price_range.low if has_range else None,
        "price_high": price_range.high if has_range else None,
        "price_level": price_range.level if has_range else None,
        "currency": currency,
        "answer": answer,
    }


def predict_images(
    loaded: LoadedModel,
    paths: Sequence[Path],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    constrain: bool = True,
    price_level: float = DEFAULT_LEVEL,
) -> Iterator[dict]:
    """Yield one record per path, in order. Images are decoded one batch at a time so memory stays flat.

    ``constrain`` forces every answer into the model's template and categories
    (:mod:`phivision.evaluate.constrain`; give ``loaded`` a taxonomy with
    :func:`phivision.answer.taxonomy.with_taxonomy`); False lets the model write freely. A constrained answer of
    a calibrated model carries its price range at ``price_level``.
    """
    from phivision.evaluate.constrain import AnswerConstraint
    from phivision.evaluate.generate import answer_image_files

    check_price_level(price_level)
    constraint = AnswerConstraint.for_model(loaded) if constrain else None
    ranged = constraint is not None and loaded.calibration is not None
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for path, completion, error in answer_image_files(
            loaded, paths, batch_size, batch_size, max_new_tokens, bar, constraint, price_spread=ranged
        ):
            if error:
                yield {"image": str(path), "error": error}
            else:
                price_range = answer_range(completion, loaded.prompt, loaded.calibration, price_level)
                yield prediction_record(
                    str(path), completion.text, loaded.prompt, loaded.currency, price_range
                )


def run_predict(
    model: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str | None = None,
    stdout: TextIO | None = None,
    constrain: bool = True,
) -> tuple[int, int]:
    """Predict for ``inputs`` and write JSON lines to ``out`` (atomically) or stream them to stdout.

    ``constrain``: see :func:`predict_images`.

    Returns (number answered, number that could not be read).
    """
    from phivision.runs import load_model

    if batch_size < 1:
        raise PhivisionError(f"--batch-size must be at least 1, got {batch_size}")
    paths = expand_inputs(inputs)
    loaded = load_model(model, device=device)
    stdout = stdout or sys.stdout
    lines, ok, failed = [], 0, 0
    records = predict_images(
        loaded, paths, batch_size=batch_size, max_new_tokens=max_new_tokens, constrain=constrain
    )
    for record in records:
        line = json.dumps(record, ensure_ascii=False)
        failed += "error" in record
        ok += "error" not in record
        if out is None:
            stdout.write(line + "\n")
            stdout.flush()
        else:
            lines.append(line)
    if out is not None:
        atomic_write_text(out, "".join(line + "\n" for line in lines))
    return ok, failed
