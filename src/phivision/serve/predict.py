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

from phivision.answer.constrain import AnswerConstraint
from phivision.answer.generate import answer_image_files
from phivision.args import Generation, PredictArgs
from phivision.errors import PhivisionError
from phivision.io import atomic_write_text
from phivision.runs import LoadedModel, load_model
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
) -> Iterator[dict]:
    """Yield one record per path, in order. Images are decoded one batch at a time so memory stays flat.

    ``constrain`` forces every answer into the model's template and recorded categories
    (:mod:`phivision.answer.constrain`); False lets the model write freely.
    """
    constraint = AnswerConstraint.for_model(loaded) if constrain else None
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for path, answer, error in answer_image_files(
            loaded, paths, batch_size, batch_size, max_new_tokens, progress=bar, constraint=constraint
        ):
            if error:
                yield {"image": str(path), "error": error}
            else:
                yield prediction_record(str(path), answer, loaded.prompt, loaded.currency)


def predict(args: PredictArgs) -> list[dict]:
    """``phivision predict`` (:class:`PredictArgs`, validated): one record per image, in order; with ``out`` the
    records are also written as JSON lines to that file (atomically), or streamed to stdout as they come
    (``out="-"``)."""
    paths = expand_inputs(args.images)
    model, loading, generation = args.model, args.loading, args.generation
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, device=loading.device, dtype=loading.dtype)
    )
    stream = args.out is not None and str(args.out) == "-"
    records = []
    for record in predict_images(
        loaded, paths, generation.batch_size, generation.max_new_tokens, args.progress, generation.constrain
    ):
        records.append(record)
        if stream:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    if args.out is not None and not stream:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
