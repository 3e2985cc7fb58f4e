"""`phivision predict`: answer for image files and directories, one JSON line per image.

Unreadable images get a line with an ``error`` field instead of stopping the batch: one corrupt photo in a
folder of thousands should cost that photo, not the run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from phivision.answer.constrain import AnswerConstraint, short_budget_note
from phivision.answer.generate import answer_image_files
from phivision.answer.ranges import answer_range
from phivision.answer.taxonomy import model_taxonomy, read_categories_file, with_taxonomy
from phivision.args import PRICE_LEVEL, Generation, PredictArgs
from phivision.errors import PhivisionError
from phivision.io import atomic_write_text, refuse_overwriting_inputs
from phivision.runs import LoadedModel, load_model, model_files
from phivision.serve.core import prediction_record

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


def predict_images(
    loaded: LoadedModel,
    paths: Sequence[Path],
    batch_size: int = Generation.batch_size,
    max_new_tokens: int = Generation.max_new_tokens,
    progress: bool = True,
    constrain: bool = True,
    price_level: float = PRICE_LEVEL,
) -> Iterator[dict]:
    """Yield one record per path, in order. Images are decoded one batch at a time so memory stays flat.

    ``constrain`` forces every answer into the model's template and categories
    (:mod:`phivision.answer.constrain`; give ``loaded`` a taxonomy with
    :func:`phivision.answer.taxonomy.with_taxonomy`); False lets the model write freely. A constrained answer of
    a calibrated model carries its price range at ``price_level``.
    """
    constraint = AnswerConstraint.for_model(loaded) if constrain else None
    budget = short_budget_note(loaded.processor, loaded.model.config.vocab_size, constraint, max_new_tokens)
    for note in (*loaded.notes, *([budget] if budget else [])):
        print(f"warning: {note}", file=sys.stderr)

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


def predict(args: PredictArgs) -> list[dict]:
    """``phivision predict`` (:class:`PredictArgs`, validated): one record per image, in order; with ``out`` the
    records are also written as JSON lines to that file (atomically), or streamed to stdout as they come
    (``out="-"``). The category space is the model's recorded categories, else ``answering.categories``."""
    paths = expand_inputs(args.images)
    model, loading, generation, answering = args.model, args.loading, args.generation, args.answering
    if args.out is not None and str(args.out) != "-":  # before the model loads: a mistake costs nothing
        inputs = [(f"the image {path}", path) for path in paths] + model_files(model)
        refuse_overwriting_inputs({"--out": args.out}, inputs)

    if answering.categories is not None:
        read_categories_file(answering.categories)  # a broken file stops before the model loads
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, device=loading.device, dtype=loading.dtype)
    )
    loaded = with_taxonomy(loaded, model_taxonomy(loaded, answering.categories))
    stream = args.out is not None and str(args.out) == "-"
    records = []
    for record in predict_images(
        loaded,
        paths,
        generation.batch_size,
        generation.max_new_tokens,
        args.progress,
        generation.constrain,
        answering.price_level,
    ):
        records.append(record)
        if stream:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    if args.out is not None and not stream:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
