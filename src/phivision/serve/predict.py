"""`phivision predict`: answer for image files and directories, one JSON line per image, or per product.

A product with several photos is answered from all of them in one prompt (as many as the model was trained
with): a directory per product (``products``), or a table (.csv/.tsv/.jsonl/.parquet) whose ``image_paths``
column lists each product's photos. Unreadable images get a line with an ``error`` field instead of stopping the
batch: one corrupt photo in a folder of thousands should cost that photo, not the run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from phivision.answer.constrain import AnswerConstraint, short_budget_note
from phivision.answer.generate import answer_image_files
from phivision.answer.ranges import answer_range
from phivision.answer.taxonomy import model_taxonomy, read_categories_file, with_taxonomy
from phivision.args import PRICE_LEVEL, Generation, PredictArgs
from phivision.data.layout import sheet_row
from phivision.data.photos import cell_urls
from phivision.data.prepare import TABLE_SUFFIXES, read_source
from phivision.errors import PhivisionError
from phivision.io import atomic_write_text, refuse_overwriting_inputs
from phivision.runs import LoadedModel, load_model, model_files
from phivision.serve.core import prediction_record

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TABLE_PHOTOS = "image_paths"  # a product table's column of photo paths: a JSON array or paths joined by "|"
TABLE_IDS = ("product_code", "id")  # the column a product table's ids are read from, the first present
PHOTO_SEPARATOR = "|"


@dataclass(frozen=True)
class Product:
    """One item to answer: its photos in prompt order, and what names it in the output (a folder, a table row)."""

    id: str
    photos: list[Path]


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory becomes its image files (by suffix, sorted, not recursive).

    A path that does not exist, or a directory without images, is a typo worth stopping for before the model
    loads, so it raises PhivisionError.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(image_files(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise PhivisionError(f"{path}: no such file or directory")
    if not paths:
        raise PhivisionError("no images given")
    return paths


def image_files(directory: Path) -> list[Path]:
    """A directory's image files (by suffix, sorted by name, not recursive); none is an error."""
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise PhivisionError(
            f"{directory}: directory has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found


def product_folders(path: Path) -> list[Path]:
    """The product folders a directory stands for: itself when it holds image files, else its subdirectories
    (sorted, one level), each of which must hold some."""
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        return [path]
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if not folders:
        raise PhivisionError(f"{path}: neither image files nor product folders in it")
    return folders


def expand_products(inputs: Sequence[str | Path], folders: bool) -> list[Path | Product]:
    """The items to answer: a table (.csv/.tsv/.jsonl/.parquet) gives one product per row; with ``folders`` a
    directory is one product (its image files by name), or a folder of such product folders; anything else as
    :func:`expand_inputs`. Checked before
    the model loads: a missing path or photo is one error line."""
    items: list[Path | Product] = []
    for given in inputs:
        path = Path(given)
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            items.extend(product_table(path))
        elif folders and path.is_dir():
            items.extend(Product(str(d), image_files(d)) for d in product_folders(path))
        else:
            items.extend(expand_inputs([path]))
    return items


def product_table(path: Path) -> list[Product]:
    """One product per row of a table: ``image_paths`` (a JSON array or paths joined by ``|``, relative to the
    table's directory) and the id from ``product_code`` or ``id`` (else the row number)."""
    frame = read_source(str(path))
    if TABLE_PHOTOS not in frame.columns:
        raise PhivisionError(
            f"{path}: no column '{TABLE_PHOTOS}' (each product's photos: a JSON array or paths joined by "
            f"'{PHOTO_SEPARATOR}'); columns: {', '.join(map(str, frame.columns))}"
        )
    named = next((c for c in TABLE_IDS if c in frame.columns), None)
    products = []
    for i, cell in enumerate(frame[TABLE_PHOTOS]):
        where = f"{path} row {sheet_row(i)}: column '{TABLE_PHOTOS}'"
        names, broken = cell_urls(cell, PHOTO_SEPARATOR)
        if broken or not names:
            raise PhivisionError(f"{where}: {broken or 'no photo given'}")
        photos = [Path(n) if Path(n).is_absolute() else path.parent / n for n in names]
        missing = next((p for p in photos if not p.is_file()), None)
        if missing is not None:
            raise PhivisionError(f"{where}: {missing}: no such file")
        ident = frame.at[i, named] if named else None
        products.append(Product(str(ident) if ident is not None else f"row {sheet_row(i)}", photos))
    if not products:
        raise PhivisionError(f"{path}: no products (the table has no rows)")
    return products


def predict_images(
    loaded: LoadedModel,
    paths: Sequence[Path | Product],
    batch_size: int = Generation.batch_size,
    max_new_tokens: int = Generation.max_new_tokens,
    progress: bool = True,
    constrain: bool = True,
    price_level: float = PRICE_LEVEL,
    max_images: int | None = None,
) -> Iterator[dict]:
    """Yield one record per path or :class:`Product`, in order. Images are decoded one batch at a time so memory
    stays flat. A product is answered from its first ``max_images`` photos (None: as many as the model was
    trained with) in one prompt; its record adds ``id`` and ``images`` (the photos used) to a photo's fields.

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
    limit = max_images or loaded.max_images
    items = [p.photos[:limit] if isinstance(p, Product) else p for p in paths]
    with tqdm(total=len(paths), desc="predict", unit="item", disable=not progress) as bar:
        answered = answer_image_files(
            loaded, items, batch_size, batch_size, max_new_tokens, bar, constraint, price_spread=ranged
        )
        for given, (item, completion, error) in zip(paths, answered, strict=True):
            first = item[0] if isinstance(given, Product) else item
            if completion is None:
                record = {"image": str(first), "error": error}
            else:
                price_range = answer_range(completion, loaded.prompt, loaded.calibration, price_level)
                record = prediction_record(
                    str(first), completion.text, loaded.prompt, loaded.currency, price_range
                )
            if isinstance(given, Product):
                record = {"id": given.id, **record, "images": [str(p) for p in item]}
                if error and completion is not None:
                    record["error"] = error  # answered from the readable photos; the others named here
            yield record


def predict(args: PredictArgs) -> list[dict]:
    """``phivision predict`` (:class:`PredictArgs`, validated): one record per image or product, in order; with
    ``out`` the records are also written as JSON lines to that file (atomically), or streamed to stdout as they
    come (``out="-"``). The category space is the model's recorded categories, else ``answering.categories``."""
    paths = expand_products(args.images, args.products)
    model, loading, generation, answering = args.model, args.loading, args.generation, args.answering
    if args.out is not None and str(args.out) != "-":  # before the model loads: a mistake costs nothing
        photos = [p for item in paths for p in (item.photos if isinstance(item, Product) else [item])]
        inputs = [(f"the image {path}", path) for path in photos] + model_files(model)
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
        price_level=answering.price_level,
        max_images=args.max_images,
    ):
        records.append(record)
        if stream:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    if args.out is not None and not stream:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
