"""Several photos per product: where a product table keeps them, and what becomes of each one.

Shop exports list a product's photos in one cell (a JSON array ``["a.jpg", "b.jpg"]``, a list from a parquet
file or a hub dataset, or text with a separator such as ``a.jpg|b.jpg``), in several columns (``image1``,
``image2``, ...), or in several rows of one product code. :func:`row_photos` reads a row's cells in column
order; :func:`merge_rows_by_code` merges the rows of one code into one product with their photos in row order.
Every photo is then downloaded and checked on its own (:mod:`phivision.data.download`), and
:func:`keep_valid_photos` keeps a product's valid photos in source order, dropping the product only when none is
valid. Every photo that does not reach the catalog is reported with its reason (:func:`photo_drop`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from phivision.data.download import Fetched, url_problem
from phivision.data.prices import cell_text, plain

# the reason of a product none of whose several photos is usable (one photo: that photo's own reason)
NO_VALID_IMAGE = "no_valid_image"
DUPLICATE = "duplicate_image"  # a photo listed twice for one product: kept once, the repeat reported


class Photo(NamedTuple):
    """One photo of a product as the table gives it: the URL (or local path) and the source and row it came
    from (a product merged from several rows has photos from each)."""

    url: str
    source: str
    row: int


class RowPhotos(NamedTuple):
    """A row's photos: the usable ones in order, and one report entry per photo that cannot be fetched."""

    photos: list[Photo]
    problems: list[dict]


def cell_urls(value: object, sep: str | None) -> tuple[list[str], str | None]:
    """The URLs one image cell holds, in order, and why the cell cannot be read (None when it can).

    A list (parquet or hub list column) gives its items; text that starts with ``[`` is a JSON array; other text
    is split on ``sep`` when one is given, else it is one URL. Empty items and placeholders (``N.A.``) are skipped.
    """
    if isinstance(value, (list, tuple, np.ndarray)):
        items: list = list(value)
    else:
        text = cell_text(value)
        if text is None:
            return [], None
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                return [], "not a JSON array of URLs"
            if not isinstance(items, list):
                return [], "not a JSON array of URLs"
        elif sep:
            items = text.split(sep)
        else:
            items = [text]
    urls = []
    for item in items:
        if isinstance(item, (dict, list)):
            return [], f"a JSON array of URLs holds {type(item).__name__} items"
        url = cell_text(item)
        if url is not None:
            urls.append(url)
    return urls, None


def row_photos(
    cells: Sequence[object], row: int, product_code: object, source: str, sep: str | None, allow_local: bool
) -> RowPhotos:
    """The photos of one table row: every URL of its image cells (``cells``, in column order), each checked
    with :func:`url_problem`; a repeated URL counts once."""
    photos: list[Photo] = []
    problems: list[dict] = []
    seen: set[str] = set()
    for cell in cells:
        urls, broken = cell_urls(cell, sep)
        if broken is not None:
            shown = cell_text(cell) if isinstance(cell, str) else plain(cell)
            problems.append(photo_drop(source, row, product_code, str(shown), "malformed_image_list", broken))
        for url in urls:
            reason = url_problem(url, allow_local)
            if reason is not None:
                detail = "only http(s) URLs (and files with --allow-local)"
                problems.append(photo_drop(source, row, product_code, url, reason, detail))
            elif url in seen:
                problems.append(
                    photo_drop(source, row, product_code, url, DUPLICATE, "listed before in the row")
                )
            else:
                seen.add(url)
                photos.append(Photo(url, source, row))
    return RowPhotos(photos, problems)


def photo_drop(source: str, row: int, product_code: object, url: str, reason: str, detail: str = "") -> dict:
    """The report entry of one photo left out of the catalog: where it was listed, the URL, why."""
    return {
        "source": source,
        "row": int(row),
        "product_code": plain(product_code),
        "url": url,
        "reason": reason,
        "detail": detail,
    }


def no_photo_reason(problems: Sequence[dict]) -> tuple[str, str]:
    """Why a product has no usable photo: ``missing_image_url`` (none given), the one photo's reason, or
    ``no_valid_image`` naming each photo's reason (repeats of a photo are not counted)."""
    problems = [p for p in problems if p["reason"] != DUPLICATE]
    if not problems:
        return "missing_image_url", ""
    if len(problems) == 1:
        return problems[0]["reason"], problems[0]["detail"]
    reasons = ", ".join(f"{n} {r}" for r, n in Counter(p["reason"] for p in problems).most_common())
    return NO_VALID_IMAGE, f"all {len(problems)} photos failed ({reasons})"


def photo_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (row, photo): the conflict rule's ``image_url`` key, with ``_index`` naming the row."""
    lines = [
        {
            "_index": index,
            "image_url": photo.url,
            **{c: rows.at[index, c] for c in ("title", "full_price", "currency")},
        }
        for index, photos in rows["_photos"].items()
        for photo in photos
    ]
    return pd.DataFrame(lines, columns=["_index", "image_url", "title", "full_price", "currency"])


def merge_rows_by_code(rows: pd.DataFrame, image_rows: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """One product per product code: the first row's fields, every row's photos in source order (``image_rows``:
    rows that hold only a code and photos, such as a shop export's extra image lines, join their code's product).

    Returns the products (``_rows`` lists the source rows of each) and the photos dropped as repeats of an
    earlier photo of the same product. Image rows whose code has no product are left out.
    """
    everything = pd.concat([rows.assign(_product=True), image_rows.assign(_product=False)], ignore_index=True)
    everything = everything.sort_values(["_order", "_row"], kind="stable")
    products, dropped = [], []
    for _, group in everything.groupby("product_code", sort=False):
        heads = group[group["_product"]]
        if heads.empty:
            continue
        product = heads.iloc[0].to_dict()
        photos: list[Photo] = []
        seen: set[str] = set()
        for photo_list in group["_photos"]:
            for photo in photo_list:
                if photo.url in seen:
                    repeat = photo_drop(
                        photo.source, photo.row, product["product_code"], photo.url, DUPLICATE
                    )
                    dropped.append({**repeat, "detail": "already a photo of this product"})
                    continue
                seen.add(photo.url)
                photos.append(photo)
        product["_photos"] = photos
        product["_problems"] = [p for problems in group["_problems"] for p in problems]
        product["_rows"] = [(s, int(r)) for s, r in zip(group["_source"], group["_row"], strict=True)]
        products.append(product)
    merged = pd.DataFrame(products, columns=[*everything.columns, "_rows"]).drop(columns=["_product"])
    return merged, dropped


class Outcome(NamedTuple):
    """What the downloads made of the products: the catalog's image paths per kept product (``None``: dropped),
    every photo left out, and the reason of each dropped product."""

    paths: list[list[str] | None]
    dropped_photos: list[dict]
    product_reasons: dict[int, tuple[str, str]]


def keep_valid_photos(products: pd.DataFrame, fetched: dict[str, Fetched], images_dir: str) -> Outcome:
    """Each product keeps its valid photos in source order; a product none of whose photos is valid is dropped,
    with the one photo's reason, or ``no_valid_image`` when it had several. The photos left out are those that
    failed here and those refused before the download (``_problems``)."""
    paths: list[list[str] | None] = []
    dropped: list[dict] = []
    reasons: dict[int, tuple[str, str]] = {}
    for position, (_, product) in enumerate(products.iterrows()):
        kept, failed = [], list(product["_problems"])
        for photo in product["_photos"]:
            result = fetched[photo.url]
            if result.status == "failed":
                reason = result.reason or "error"
                failed.append(
                    photo_drop(
                        photo.source,
                        photo.row,
                        product["product_code"],
                        photo.url,
                        reason,
                        result.detail,
                    )
                )
            else:
                kept.append(f"{images_dir}/{result.file}")
        dropped += failed
        paths.append(kept or None)
        if not kept:
            reasons[position] = no_photo_reason(failed)
    return Outcome(paths, dropped, reasons)


def photos_report(paths: Sequence[list[str]], dropped: Sequence[dict]) -> dict:
    """The report's count of photos: per product (how many products have 1, 2, ... photos), in the catalog, and
    left out by reason."""
    per_product = Counter(len(p) for p in paths)
    return {
        "per_product": {str(k): per_product[k] for k in sorted(per_product)},
        "in_catalog": sum(per_product[k] * k for k in per_product),
        "left_out": len(dropped),
        "left_out_by_reason": dict(Counter(p["reason"] for p in dropped).most_common()),
    }
