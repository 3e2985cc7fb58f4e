"""``phivision inspect DIR``: look at a dataset before training on it.

One pass over the catalog and the image files (headers for sizes; a 32x32 grey thumbnail per image for a
perceptual hash and a flatness check) gives ``inspect.json`` and a self-contained ``inspect.html`` beside it:

* rows per split and category, and the category balance;
* the price distribution of each category (with the currency);
* photos per product; image sizes and aspect ratios (every photo), and what they cost: image tokens per sample
  for each ``num_crops`` (the model's own HD geometry) and each ``max_images`` (a product's first N photos in one
  prompt), and the image tokens of one training epoch;
* near-duplicate images in different splits (perceptual hash, leakage), colour-variant groups (titles that
  match after normalisation), conflicting duplicates (same product code or same image file, different title,
  price or currency), placeholder images (one file for many products, flat images) and outliers (prices far
  from their category, tiny or extreme images, unreadable files). These look at each product's first photo;
  an unreadable later photo is listed under photos.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from phivision.args import MAX_BYTES, MAX_PIXELS, InspectArgs, parse_num_crops
from phivision.data.duplicates import conflict_groups
from phivision.data.images import ImageError, open_image
from phivision.data.inspect_page import SHOWN, render_page
from phivision.data.layout import INSPECT_FILES, SPLITS, dataset_files, load_catalog, sheet_row
from phivision.data.prices import PLACEHOLDERS
from phivision.data.split import group_key
from phivision.io import (
    ReadError,
    atomic_write_json,
    atomic_write_text,
    read_bytes_bounded,
    refuse_overwriting_inputs,
)
from phivision.model.image_processing_phi3_v import Phi3VImageProcessor

HASH_SIDE = 32  # thumbnail side for the DCT hash
FLAT_STD = 3.0  # a thumbnail whose grey levels vary less than this is a flat (blank) image
TINY_SIDE = 64  # images smaller than this on a side are outliers
EXTREME_ASPECT = 4.0  # and so are images longer than this times their width (or the reverse)
PRICE_OUTLIER_MADS = 4.0  # prices this many robust deviations from the category's median (log scale)
PLACEHOLDER_ROWS = 3  # one image file shared by at least this many rows with different titles


@dataclass
class ImageFacts:
    """What one image file tells without a full decode at full size."""

    width: int = 0
    height: int = 0
    sha256: str = ""
    phash: int = 0
    grey_std: float = 0.0
    error: str | None = None


# ------------------------------------------------------------------------------------------------ entry


def inspect(args: InspectArgs, workers: int | None = None) -> dict:
    """Inspect the dataset ``args.data``; write ``inspect.html`` (``args.out``, default ``DATA/inspect.html``) and
    ``inspect.json`` beside it, and return the JSON's content. ``args``: every flag of ``phivision inspect``
    (:class:`InspectArgs`, validated); ``workers``: image-reading threads (default: cores + 1, at most 4)."""
    started = time.perf_counter()
    crops = parse_num_crops(args.num_crops)
    data, crop_size, num_img_tokens = args.data, args.crop_size, args.num_img_tokens
    html_path = args.out if args.out is not None else data / INSPECT_FILES[0]
    catalog = load_catalog(data, check_images=False)
    outputs = {"--out": html_path, "the JSON beside --out": html_path.with_suffix(".json")}
    refuse_overwriting_inputs(outputs, dataset_files(data, catalog))
    every_photo = pd.Series([p for paths in catalog["image_paths"] for p in paths], dtype=object)
    facts = scan_images(data, every_photo, workers=workers, progress=args.progress)
    frame = _with_facts(catalog, facts)
    photos = photo_frame(catalog, facts)
    scanned = time.perf_counter()
    result = {
        "dataset": str(data),
        "rows": len(frame),
        "splits": split_table(frame),
        "balance": balance(frame),
        "prices": price_summary(frame),
        "photos": photo_summary(photos),
        "images": image_summary(photos),
        "tokens": token_costs(frame, crops, crop_size, num_img_tokens, photos),
        "near_duplicates": near_duplicates(frame, args.near_duplicate_bits),
        "variants": variant_groups(frame),
        "conflicts": conflicts(frame),
        "placeholders": placeholders(frame),
        "outliers": outliers(frame),
    }
    found = time.perf_counter()
    result["seconds"] = round(found - started, 3)  # updated below, once the page is written
    page = render_page(result, frame, data, photos)
    done = time.perf_counter()
    result["seconds"] = round(done - started, 3)
    result["timings"] = {
        "read_and_scan_images": round(scanned - started, 3),
        "findings": round(found - scanned, 3),
        "page": round(done - found, 3),
    }
    json_path = html_path.with_suffix(".json")
    atomic_write_json(json_path, result)
    atomic_write_text(html_path, page)
    result["files"] = {"html": str(html_path), "json": str(json_path)}
    return result


# ------------------------------------------------------------------------------------------------ images


def scan_images(directory: Path, paths: pd.Series, workers: int | None = None, progress: bool = True) -> dict:
    """``{image_path: ImageFacts}`` for every distinct path, read by a few threads (Pillow decodes outside
    the GIL)."""
    unique = list(dict.fromkeys(paths))
    workers = workers or min(4, (os.cpu_count() or 2) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scanned = pool.map(lambda rel: image_facts(directory / rel), unique, chunksize=16)
        facts = list(tqdm(scanned, total=len(unique), desc="images", unit="img", disable=not progress))
    return dict(zip(unique, facts, strict=True))


def image_facts(path: Path) -> ImageFacts:
    """Size from the header, SHA-256 of the bytes, and the perceptual hash and grey spread of a 32x32
    thumbnail (JPEGs decoded at reduced scale). Never raises: a bad file gets ``error``, the reason the one
    image loader gives (``missing``, ``not_a_file``, ``too_large``, ``too_many_pixels``, ``corrupt``...)."""
    try:
        data = read_bytes_bounded(path, MAX_BYTES)
    except ReadError as err:
        return ImageFacts(error=err.reason)
    facts = ImageFacts(sha256=hashlib.sha256(data).hexdigest())
    try:
        with open_image(data, max_pixels=MAX_PIXELS) as image:
            facts.width, facts.height = image.size
            image.draft("L", (HASH_SIDE * 2, HASH_SIDE * 2))
            grey = image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR)
    except ImageError as err:
        facts.error = err.reason
        return facts
    except Exception as err:  # noqa: BLE001  (anything Pillow throws while decoding a broken file)
        facts.error = "truncated" if "truncat" in str(err).lower() else "corrupt"
        return facts
    pixels = np.asarray(grey, dtype=np.float64)
    facts.phash = perceptual_hash(pixels)
    facts.grey_std = float(pixels.std())
    return facts


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(HASH_SIDE)


def perceptual_hash(grey: np.ndarray) -> int:
    """The 64-bit DCT hash of a 32x32 grey image: the 8x8 lowest frequencies, each bit set when the coefficient
    is above their median (DC excluded from the median). Resizing, recompression and small edits move few bits."""
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between uint64 hashes (broadcasting)."""
    x = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


def _with_facts(catalog: pd.DataFrame, facts: dict) -> pd.DataFrame:
    """The catalog with its first photos' facts (``_width``, ``_ok``...)."""
    frame = catalog.copy()
    for name in ("width", "height", "sha256", "phash", "grey_std", "error"):
        frame["_" + name] = [getattr(facts[p], name) for p in frame["image_path"]]
    frame["_phash"] = frame["_phash"].astype("uint64")
    frame["_ok"] = frame["_error"].isna()
    return frame


def photo_frame(catalog: pd.DataFrame, facts: dict) -> pd.DataFrame:
    """One line per photo of every product: ``_product`` (its catalog position), ``_position`` (1 for the first
    photo), ``split``, ``image_path`` and the photo's facts."""
    lines = [
        {"_product": i, "_position": k, "split": split, "image_path": path}
        for i, (split, paths) in enumerate(zip(catalog["split"], catalog["image_paths"], strict=True))
        for k, path in enumerate(paths, start=1)
    ]
    return _with_facts(pd.DataFrame(lines, columns=["_product", "_position", "split", "image_path"]), facts)


# ------------------------------------------------------------------------------------------------ tables


def split_table(frame: pd.DataFrame) -> dict:
    """Rows per split, and per category and split."""
    counts = frame.groupby(["category", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(SPLITS), fill_value=0)
    return {
        "totals": {s: int((frame["split"] == s).sum()) for s in SPLITS},
        "by_category": {
            str(c): {s: int(counts.at[c, s]) for s in SPLITS} for c in sorted(counts.index, key=str)
        },
    }


def balance(frame: pd.DataFrame) -> dict:
    """How even the categories are: shares, the largest/smallest ratio, the effective number of categories
    (exp of the entropy), and categories missing from val or test."""
    counts = frame["category"].value_counts()
    shares = counts / counts.sum()
    present = {s: set(frame.loc[frame["split"] == s, "category"]) for s in SPLITS}
    return {
        "categories": len(counts),
        "shares": {str(k): round(float(v), 4) for k, v in shares.items()},
        "largest_to_smallest": round(float(counts.max() / counts.min()), 2),
        "effective_categories": round(float(np.exp(-(shares * np.log(shares)).sum())), 2),
        "missing_from": {
            s: sorted(str(c) for c in counts.index if c not in present[s]) for s in ("val", "test")
        },
    }


def price_summary(frame: pd.DataFrame) -> dict:
    """Quantiles of ``full_price`` per category and currency."""
    out = {}
    for (category, currency), rows in frame.groupby(["category", "currency"], sort=True):
        prices = rows["full_price"].to_numpy()
        q = np.quantile(prices, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
        out.setdefault(str(category), {})[str(currency)] = {
            "rows": len(prices),
            **{
                k: round(float(v), 2)
                for k, v in zip(("min", "p10", "p25", "median", "p75", "p90", "max"), q, strict=True)
            },
            "mean": round(float(prices.mean()), 2),
        }
    return out


def photo_summary(photos: pd.DataFrame) -> dict:
    """Photos per product (how many products have 1, 2, ... photos) and the photos that cannot be read, with
    their product's row and place (a later photo breaks a run that uses it as surely as the first)."""
    per_product = photos.groupby("_product").size().value_counts().sort_index()
    bad = photos[~photos["_ok"]]
    return {
        "per_product": {str(k): int(v) for k, v in per_product.items()},
        "mean": round(float(len(photos) / max(1, photos["_product"].nunique())), 2),
        "most": int(per_product.index.max()) if len(per_product) else 0,
        "photos": len(photos),
        "unreadable": len(bad),
        "unreadable_examples": [
            {
                "row": sheet_row(r["_product"]),
                "photo": int(r["_position"]),
                "image_path": str(r["image_path"]),
                "reason": str(r["_error"]),
            }
            for _, r in bad.head(SHOWN).iterrows()
        ],
    }


def image_summary(frame: pd.DataFrame) -> dict:
    """Sizes and aspect ratios of the readable images (each file once); unreadable ones by reason."""
    files = frame.drop_duplicates("image_path")
    good = files[files["_ok"]]
    aspect = good["_width"] / good["_height"]
    summary = {
        "files": len(files),
        "readable": len(good),
        "unreadable": dict(Counter(files.loc[~files["_ok"], "_error"]).most_common()),
    }
    if len(good):
        for name, values in (("width", good["_width"]), ("height", good["_height"]), ("aspect", aspect)):
            q = np.quantile(values.to_numpy(dtype=float), [0.0, 0.5, 1.0])
            summary[name] = {
                "min": round(float(q[0]), 3),
                "median": round(float(q[1]), 3),
                "max": round(float(q[2]), 3),
            }
        summary["landscape"] = int((aspect > 1.05).sum())
        summary["portrait"] = int((aspect < 1 / 1.05).sum())
        summary["square"] = len(good) - summary["landscape"] - summary["portrait"]
    return summary


def token_costs(
    frame: pd.DataFrame,
    crops: list[int],
    crop_size: int,
    num_img_tokens: int,
    photos: pd.DataFrame | None = None,
) -> dict:
    """Image tokens per sample for each ``num_crops`` with the model's own geometry, and the image tokens of
    one epoch over the train split (what a training run pays per epoch, before the text): ``by_num_crops`` for
    the first photo, ``by_max_images`` for a product's first N photos in one prompt (``data.max_images``)."""
    processors = {
        n: Phi3VImageProcessor(num_crops=n, crop_size=crop_size, num_img_tokens=num_img_tokens) for n in crops
    }
    cache: dict[tuple[int, int, int], int] = {}

    def cost(n: int, size: tuple[int, int]) -> int:
        return cache.setdefault((n, *size), processors[n].calc_num_image_tokens(*size))

    good = frame[frame["_ok"]]
    sizes = list(zip(good["_width"].astype(int), good["_height"].astype(int), strict=True))
    train = (good["split"] == "train").to_numpy()
    rows = [{"num_crops": n, **_spread([cost(n, s) for s in sizes], train)} for n in crops]
    by_max_images = []
    if photos is not None:
        readable = photos[photos["_ok"]]
        counts = photos.groupby("_product").size()
        most = int(counts.max()) if len(counts) else 1
        for m in sorted({*range(1, min(most, 4) + 1), most}):
            used = readable[readable["_position"] <= m]
            for n in crops:
                per_photo = [
                    cost(n, (int(w), int(h))) for w, h in zip(used["_width"], used["_height"], strict=True)
                ]
                per_product = (
                    pd.Series(per_photo, index=used.index, dtype="int64").groupby(used["_product"]).sum()
                )
                split = frame["split"].to_numpy()[per_product.index.to_numpy()]
                by_max_images.append(
                    {"max_images": m, "num_crops": n, **_spread(per_product.tolist(), split == "train")}
                )
    return {
        "crop_size": crop_size,
        "num_img_tokens": num_img_tokens,
        "train_rows": int(train.sum()),
        "by_num_crops": rows,
        "by_max_images": by_max_images,
    }


def _spread(tokens: list[int], train: np.ndarray) -> dict:
    """Quantiles of image tokens per sample, and their sum over the train split and over all splits."""
    values = np.array(tokens or [0])
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 1),
        "p95": float(np.quantile(values, 0.95)),
        "max": int(values.max()),
        "train_epoch": int(values[train].sum()) if tokens else 0,
        "all_splits": int(values.sum()) if tokens else 0,
    }


# ------------------------------------------------------------------------------------------------ findings


def near_duplicates(frame: pd.DataFrame, max_bits: int, keep: int = 200) -> dict:
    """Pairs of rows in different splits whose images are at most ``max_bits`` apart (of 64): the same photo,
    resized or recompressed, seen in training and scored in test. Counts every pair; keeps ``keep`` examples."""
    good = frame[frame["_ok"]].reset_index()
    hashes = good["_phash"].to_numpy(dtype=np.uint64)
    split_ids = good["split"].map({s: k for k, s in enumerate(SPLITS)}).to_numpy()
    pairs, pair_kinds, examples = 0, np.zeros(len(SPLITS) ** 2, dtype=np.int64), []
    block = max(16, 4_000_000 // max(1, len(good)))  # rows per step: about 32 MB of distances at a time
    for start in range(0, len(good), block):
        distance = hamming(hashes[start : start + block, None], hashes[None, :])
        i, j = np.nonzero(distance <= max_bits)
        i = i + start
        mask = (j > i) & (split_ids[i] != split_ids[j])
        i, j = i[mask], j[mask]
        pairs += len(i)
        low, high = np.minimum(split_ids[i], split_ids[j]), np.maximum(split_ids[i], split_ids[j])
        pair_kinds += np.bincount(low * len(SPLITS) + high, minlength=len(SPLITS) ** 2)
        for a, b in zip(i[: keep - len(examples)], j[: keep - len(examples)], strict=True):
            examples.append(
                {
                    "rows": [sheet_row(good.at[a, "index"]), sheet_row(good.at[b, "index"])],
                    "bits": int(distance[a - start, b]),
                    "same_file": bool(good.at[a, "_sha256"] == good.at[b, "_sha256"]),
                }
            )
    by_splits = {
        f"{SPLITS[k // len(SPLITS)]}/{SPLITS[k % len(SPLITS)]}": int(n) for k, n in enumerate(pair_kinds) if n
    }
    return {
        "max_bits": max_bits,
        "pairs": pairs,
        "by_splits": dict(sorted(by_splits.items())),
        "examples": examples,
    }


def variant_groups(frame: pd.DataFrame) -> dict:
    """Colour variants: rows whose titles match after normalisation. ``straddling`` counts groups found in more
    than one split (``prepare`` never does that; a hand-made split may)."""
    keys = frame["title"].map(group_key)
    sizes = keys.value_counts()
    multi = sizes[sizes > 1]
    splits_per_group = frame.groupby(keys)["split"].nunique()
    groups = []
    for key in multi.index[:SHOWN]:
        rows = frame[keys == key]
        groups.append(
            {
                "title": str(rows["title"].iloc[0]),
                "rows": len(rows),
                "categories": sorted(map(str, set(rows["category"]))),
                "splits": sorted(set(rows["split"])),
                "prices": sorted({float(p) for p in rows["full_price"]}),
            }
        )
    return {
        "groups": len(multi),
        "rows": int(multi.sum()),
        "largest": int(multi.max()) if len(multi) else 0,
        "straddling": int((splits_per_group[multi.index] > 1).sum()) if len(multi) else 0,
        "examples": groups,
    }


def conflicts(frame: pd.DataFrame) -> dict:
    """Conflicting duplicates by the rule ``prepare`` applies: the same product code, or the same image file
    (identical bytes), with a different title, price or currency."""
    found = conflict_groups(frame, "product_code") + conflict_groups(
        frame.assign(image_file=frame["_sha256"].where(frame["_sha256"] != "")), "image_file"
    )
    return {
        "groups": len(found),
        "rows": sum(len(g.rows) for g in found),
        "by_key": dict(Counter(g.column for g in found)),
        "examples": [
            {**g.as_dict(), "row_numbers": [sheet_row(r) for r in g.rows[:10]]} for g in found[:SHOWN]
        ],
    }


def placeholders(frame: pd.DataFrame) -> dict:
    """Images that stand in for a missing photo: one file shared by several products with different titles,
    and flat images (almost one colour); placeholder titles (``N/A``...)."""
    ok = frame[frame["_ok"] & (frame["_sha256"] != "")]
    counts = ok["_sha256"].value_counts()
    shared = []
    for _, rows in ok[ok["_sha256"].isin(counts.index[counts >= PLACEHOLDER_ROWS])].groupby("_sha256"):
        titles = set(rows["title"].map(group_key))
        if len(rows) >= PLACEHOLDER_ROWS and len(titles) > 1:
            shared.append(
                {
                    "rows": len(rows),
                    "titles": len(titles),
                    "image_path": str(rows["image_path"].iloc[0]),
                    "row_numbers": [sheet_row(i) for i in rows.index[:10]],
                }
            )
    shared.sort(key=lambda item: -item["rows"])
    flat = ok[ok["_grey_std"] < FLAT_STD]
    titles = frame[frame["title"].str.strip().str.lower().isin(PLACEHOLDERS)]
    return {
        "shared_images": len(shared),
        "rows_on_shared_images": sum(s["rows"] for s in shared),
        "shared_examples": shared[:SHOWN],
        "flat_images": int(flat["image_path"].nunique()),
        "flat_examples": [
            {"row": sheet_row(i), "image_path": str(p)} for i, p in flat["image_path"].head(SHOWN).items()
        ],
        "placeholder_titles": len(titles),
    }


def outliers(frame: pd.DataFrame) -> dict:
    """Prices far from their category (log scale, robust z above ``PRICE_OUTLIER_MADS``), tiny and
    extreme-aspect images, and unreadable files."""
    logs = np.log(frame["full_price"])
    median = logs.groupby(frame["category"]).transform("median")
    mad = (logs - median).abs().groupby(frame["category"]).transform("median") * 1.4826
    z = ((logs - median) / mad.where(mad > 0)).abs()
    far = frame[z > PRICE_OUTLIER_MADS]
    ok = frame[frame["_ok"]]
    tiny = ok[(ok["_width"] < TINY_SIDE) | (ok["_height"] < TINY_SIDE)]
    aspect = ok["_width"] / ok["_height"]
    extreme = ok[(aspect > EXTREME_ASPECT) | (aspect < 1 / EXTREME_ASPECT)]
    bad = frame[~frame["_ok"]]
    return {
        "price": len(far),
        "price_examples": [
            {
                "row": sheet_row(i),
                "category": str(r.category),
                "full_price": float(r.full_price),
                "currency": str(r.currency),
                "category_median": round(float(math.exp(median[i])), 2),
            }
            for i, r in far.head(SHOWN).iterrows()
        ],
        "tiny_images": len(tiny),
        "extreme_aspect": len(extreme),
        "unreadable": len(bad),
        "unreadable_examples": [
            {"row": sheet_row(i), "image_path": str(r.image_path), "reason": str(r._error)}
            for i, r in bad.head(SHOWN).iterrows()
        ],
    }
