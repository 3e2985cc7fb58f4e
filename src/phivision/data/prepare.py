"""``phivision prepare``: a product table (hub dataset, CSV, Parquet, JSONL) -> a local dataset directory.

Reads and checks every source first (a broken table fails before anything is downloaded), cleans rows (each
dropped row keeps its reason; prices through :mod:`phivision.data.prices`), resolves conflicting duplicates
(:mod:`phivision.data.duplicates`), downloads the images (:mod:`phivision.data.download`: one failed URL never
stops the run), splits by category without leaking title-sharing variants, and writes ``catalog.parquet`` and
``prepare_report.json`` atomically. An ``--out`` holding another dataset is refused (``--overwrite`` builds the new
one beside it and swaps it in once complete); a rerun of the same command resumes.

Row numbers in messages and in the report count as a spreadsheet shows a table: the header is row 1, the first
product row 2 (JSON Lines sources: line numbers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from phivision.args import Columns, PrepareArgs, split_ratios
from phivision.data.download import download_images, file_stem
from phivision.data.duplicates import resolve_conflicts
from phivision.data.layout import (
    CATALOG_FILE,
    IMAGE_PATHS,
    IMAGES_DIR,
    REPORT_FILE,
    REQUIRED_COLUMNS,
    SPLITS,
    claim_out,
    dataset_identity,
    finish_out,
)
from phivision.data.photos import (
    keep_valid_photos,
    merge_rows_by_code,
    no_photo_reason,
    photo_table,
    photos_report,
    row_photos,
)
from phivision.data.prices import Price, cell_text, decide_convention, plain, read_price
from phivision.data.split import assign_splits
from phivision.errors import PhivisionError
from phivision.io import atomic_write_json, atomic_write_parquet, read_text_bounded, warn
from phivision.options import flag_name

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson", ".json")
CONFLICT_KEYS = ("product_code", "image_url")
CONFLICT_RULE = (
    "rows sharing a product_code (then, among the rows left, an image URL) but differing in title, price or "
    "currency: the version held by a strict majority of the group's rows is kept, the others dropped; without a "
    "strict majority the whole group is dropped (reason conflicting_duplicate)"
)
# what the pipeline carries beside a row's own columns: where it came from, its photos, its rows once merged
INTERNAL_COLUMNS = ("_source", "_row", "_order", "_url", "_photos", "_problems", "_rows")
ROW_NUMBERS = (
    "as a spreadsheet shows the table: the header is row 1, the first product row 2 (JSON Lines: line)"
)


# ------------------------------------------------------------------------------------------------- reading


def read_source(
    source: str, hub_split: str | None = "train", hub_config: str | None = None, revision: str | None = None
) -> pd.DataFrame:
    """One table as a DataFrame: a local CSV/TSV/Parquet/JSONL file, a local dataset directory, or a hub id
    (through ``datasets.load_dataset``, so the hub cache, tokens and offline mode behave as usual)."""
    path = Path(source)
    if path.is_dir():
        return _read_dataset(source, hub_split, hub_config, revision, local=True)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise PhivisionError(f"{path}: unknown file type '{suffix}' (use .csv, .tsv, .parquet or .jsonl)")
        if path.stat().st_size == 0:
            raise PhivisionError(f"{path}: empty file")
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        if suffix in (".parquet", ".pq"):
            try:
                return pd.read_parquet(path)
            except Exception as err:
                raise PhivisionError(
                    f"{path}: not a readable parquet file ({type(err).__name__}: {err})"
                ) from None
        return _read_jsonl(path)
    if path.suffix.lower() in TABLE_SUFFIXES or source.startswith((".", "/", "~")):
        raise PhivisionError(f"{source}: file not found")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise PhivisionError(f"--source {source!r}: not a file, a directory or a hub dataset id (owner/name)")
    return _read_dataset(source, hub_split, hub_config, revision, local=False)


def _read_csv(path: Path, sep: str) -> pd.DataFrame:
    # CSV has no types: read text as text, so codes keep their leading zeros and sibling files combine
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PhivisionError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
        ) from None
    except pd.errors.EmptyDataError:
        raise PhivisionError(f"{path}: empty file (no header, no rows)") from None
    except pd.errors.ParserError as err:
        raise PhivisionError(f"{path}: {str(err).strip().splitlines()[-1]}") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    text = read_text_bounded(path)  # a regular file of at most 1 GB, UTF-8 (else one line naming the byte)
    lines: list[int] | None = None
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise PhivisionError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(records, list):
            raise PhivisionError(f"{path}: expected one JSON array of objects")
    else:
        records, lines = [], []
        numbered = list(enumerate(text.splitlines(), start=1))
        for lineno, line in numbered:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    if lineno == len(numbered) and not text.endswith("\n"):  # cut by a killed writer
                        warn(f"{path} line {lineno}: cut short (no newline, not JSON); skipped")
                        continue
                    raise PhivisionError(f"{path} line {lineno}: invalid JSON ({err.msg})") from None
                lines.append(lineno)
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        where = f"line {lines[bad]}" if lines is not None else f"item {bad + 1}"
        raise PhivisionError(f"{path} {where}: expected a JSON object, got {type(records[bad]).__name__}")
    frame = pd.DataFrame.from_records(records)
    if lines is not None:
        frame.attrs["line_numbers"] = lines  # the report names a JSON Lines row by its line
    return frame


def _read_dataset(
    source: str, split: str | None, config: str | None, revision: str | None, local: bool
) -> pd.DataFrame:
    import datasets

    try:
        if local and (
            (Path(source) / "state.json").is_file() or (Path(source) / "dataset_dict.json").is_file()
        ):
            data = datasets.load_from_disk(source)  # written by Dataset.save_to_disk
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise PhivisionError(
                        f"{source}: no split {split!r} (has {', '.join(data)}); use --hub-split"
                    )
                data = data[split]
        else:
            data = datasets.load_dataset(source, name=config, split=split, revision=revision)
            if isinstance(data, datasets.DatasetDict):  # split=None: every split, one after the other
                data = datasets.concatenate_datasets(list(data.values()))
    except PhivisionError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise PhivisionError(
            f"--source {source}: cannot load dataset ({type(err).__name__}: {first})"
        ) from None
    return data.to_pandas()


# ------------------------------------------------------------------------------------------------ cleaning


def _as_text_column(series: pd.Series) -> pd.Series:
    return pd.Series([cell_text(v) for v in series], index=series.index, dtype=object)


def _encodable(value: object) -> bool:
    """False for text holding a lone surrogate (a JSON ``\\ud800`` escape): it cannot be written as UTF-8."""
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def normalise_types(frame: pd.DataFrame, text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Make columns safe to combine and to write: ``text_columns`` and ``*_code`` columns become text, and any
    column holding a mix of text and numbers (sibling datasets swap the types of ``product_code`` and
    ``category3_code``) becomes text too."""
    frame = frame.copy()
    for column in frame.columns:
        series = frame[column]
        mixed = series.dtype == object and len({type(v) for v in series.dropna()}) > 1
        if column in text_columns or str(column).endswith("_code") or mixed:
            frame[column] = _as_text_column(series)
    return frame


def row_numbers(frame: pd.DataFrame) -> tuple[str, list[int]]:
    """How a person finds each row of a source table: ``("line", numbers)`` for JSON Lines, else ``("row",
    numbers)`` counted as a spreadsheet shows the table (the header is row 1, the first product row 2)."""
    lines = frame.attrs.get("line_numbers")
    if lines is not None and len(lines) == len(frame):
        return "line", [int(n) for n in lines]
    return "row", list(range(2, len(frame) + 2))


def check_table(frame: pd.DataFrame, label: str, columns: Columns, currency: str | None) -> None:
    """Whole-table mistakes that no row-by-row cleaning can fix: raise a one-line PhivisionError."""
    if len(frame) == 0:
        raise PhivisionError(f"{label}: empty table (no rows)")
    fields = columns.by_field()
    # field -> option: the column options come first in the group, in by_field's order
    names = [f.name for f in dataclasses.fields(columns)][: len(fields)]
    options = dict(zip(fields, names, strict=True))
    if currency is not None:
        fields.pop("currency")
    pairs = [(f, c) for f, named in fields.items() for c in ([named] if isinstance(named, str) else named)]
    for field, column in pairs:
        if column not in frame.columns:
            flag = flag_name(options[field])
            hint = " or pass --currency" if field == "currency" else ""
            raise PhivisionError(
                f"{label}: column '{column}' not found (set {flag}{hint}); columns: {', '.join(map(str, frame.columns))}"
            )


def read_prices(
    frame: pd.DataFrame,
    label: str,
    column: str,
    currencies: pd.Series,
    decimal_comma: bool | None,
    max_price: float,
) -> tuple[list[Price], dict]:
    """The price column read with one decimal convention (flag, else the column's majority); fails with one
    line when not a single cell is a usable price. Returns the cells read and the report's ``prices`` entry."""
    values = frame[column].tolist()
    convention = decide_convention(values, decimal_comma)
    prices = [
        read_price(v, convention.decimal_comma, max_price, c) for v, c in zip(values, currencies, strict=True)
    ]
    if not any(p.value is not None for p in prices):
        word, numbers = row_numbers(frame)
        if any(p.reason == "ambiguous_price" for p in prices):
            raise PhivisionError(
                f"{label}: column '{column}': every price reads two ways (e.g. {word} {numbers[0]}: "
                f"{plain(values[0])!r}); pass --decimal-comma or --decimal-point"
            )
        raise PhivisionError(
            f"{label}: column '{column}': no value parses as a price ({word} {numbers[0]}: {plain(values[0])!r})"
        )
    entry = convention.describe()
    entry["ambiguous_read_by_convention"] = sum(
        1 for v, p in zip(values, prices, strict=True) if p.value is not None and _has_two_readings(v)
    )
    return prices, entry


def _has_two_readings(value: object) -> bool:
    return read_price(value).reason == "ambiguous_price"


def clean_rows(
    frame: pd.DataFrame,
    label: str,
    columns: Columns,
    currency: str | None,
    allow_local: bool,
    decimal_comma: bool | None,
    max_price: float,
) -> tuple[pd.DataFrame, list[dict], dict, pd.DataFrame, list[dict]]:
    """Map and clean one source's rows. Returns the usable rows (with ``_source``, ``_row``, ``_url``, and
    ``_photos``/``_problems``: the row's usable photos and the photos refused, see :mod:`phivision.data.photos`),
    one dict per dropped row with its reason, the source's price-reading summary, the image rows (with
    ``columns.group_by_code``: rows holding only a product code and photos, which join their product) and the
    photos of dropped rows that were refused.

    A row without a usable photo is dropped here, unless ``group_by_code`` (another row of its code may have one).
    """
    group_by_code = columns.group_by_code
    check_table(frame, label, columns, currency)
    _, numbers = row_numbers(frame)
    frame = frame.reset_index(drop=True)
    cells = list(frame[list(columns.image_col)].itertuples(index=False, name=None))
    text_columns = [c for f, c in columns.by_field().items() if f not in ("price", "image_url")]
    frame = normalise_types(frame, text_columns)
    currencies = (
        pd.Series(currency, index=frame.index) if currency is not None else frame[columns.currency_col]
    )
    prices, price_entry = read_prices(frame, label, columns.price_col, currencies, decimal_comma, max_price)
    # a source with the catalog's own columns (a phivision catalog prepared again) gives way to the new ones
    out = frame.drop(columns=[c for c in (*REQUIRED_COLUMNS, IMAGE_PATHS) if c in frame.columns])
    out.insert(0, "product_code", frame[columns.code_col])
    out.insert(1, "title", frame[columns.title_col])
    out.insert(2, "category", frame[columns.category_col])
    out.insert(3, "full_price", pd.Series([p.value for p in prices], index=frame.index, dtype="float64"))
    out.insert(4, "currency", currencies)
    out["_source"] = label
    out["_row"] = numbers
    found = [
        row_photos(row_cells, number, code, label, columns.image_sep, allow_local)
        for row_cells, number, code in zip(cells, numbers, out["product_code"], strict=True)
    ]
    out["_photos"] = pd.Series([f.photos for f in found], index=out.index, dtype=object)
    out["_problems"] = pd.Series([f.problems for f in found], index=out.index, dtype=object)
    out["_url"] = [
        f.photos[0].url if f.photos else f.problems[0]["url"] if f.problems else plain(c[0])
        for f, c in zip(found, cells, strict=True)
    ]
    image_only = pd.Series(False, index=out.index)
    if group_by_code:  # a shop export's extra photo lines: a code and photos, nothing else
        image_only = (
            out["product_code"].notna()
            & out["title"].isna()
            & out["category"].isna()
            & pd.Series([p.reason == "missing_price" for p in prices], index=out.index)
            & pd.Series([bool(f.photos or f.problems) for f in found], index=out.index)
        )
    checks = [
        ("missing_product_code", out["product_code"].isna()),
        ("missing_title", out["title"].isna()),
        ("missing_category", out["category"].isna()),
        ("invalid_text", ~out[["product_code", "title", "category", "currency"]].map(_encodable).all(axis=1)),
        ("price", out["full_price"].isna()),
        ("missing_currency", out["currency"].isna()),
        ("photo", out["_photos"].map(len).eq(0) & (not group_by_code)),
    ]
    reason = pd.Series(None, index=out.index, dtype=object)
    for name, mask in checks:  # the first failing check names the row's reason
        reason = reason.mask(reason.isna() & ~image_only & mask.to_numpy(), name)
    dropped, refused = [], []
    for i in out.index[reason.notna()]:
        why, detail, url = reason[i], "", out.at[i, "_url"]
        if why == "price":
            why, detail = prices[i].reason, prices[i].detail
        elif why == "photo":
            why, detail = no_photo_reason(found[i].problems)
            refused += found[i].problems
        dropped.append(_dropped(out.loc[i], why, url, detail))
    counted = [p.reason for p, extra in zip(prices, image_only, strict=True) if p.reason and not extra]
    price_entry["dropped"] = dict(Counter(counted).most_common())
    keep = reason.isna() & ~image_only
    return (
        out[keep].reset_index(drop=True),
        dropped,
        price_entry,
        out[image_only].reset_index(drop=True),
        refused,
    )


def _dropped(row: pd.Series, reason: str, url: object = None, detail: str = "") -> dict:
    url = plain(url)
    entry = {
        "source": row["_source"],
        "row": int(row["_row"]),
        "product_code": row["product_code"],
        "url": None if url is None or (isinstance(url, float) and math.isnan(url)) else str(url),
        "reason": reason,
        "detail": detail,
    }
    return entry


def _dropped_product(product: pd.Series, reason: str, detail: str) -> list[dict]:
    """One entry per source row of a dropped product (several with ``group_by_code``)."""
    rows = product.get("_rows")
    if not isinstance(rows, list):
        return [_dropped(product, reason, product["_url"], detail)]
    return [
        _dropped(
            pd.Series({**product.to_dict(), "_source": source, "_row": row}), reason, product["_url"], detail
        )
        for source, row in rows
    ]


# ------------------------------------------------------------------------------------------------ pipeline


def prepare(args: PrepareArgs) -> dict:
    """Build the dataset in ``args.out`` from one or more product tables and return the report (also written to
    ``out/prepare_report.json``). ``args`` holds every flag of ``phivision prepare`` (:class:`PrepareArgs`),
    validated.

    Rerunning with the same sources resumes: every image already downloaded is re-validated and reused. An
    ``out`` holding another dataset is refused unless ``overwrite``. ``prices.decimal_comma`` True/False fixes the
    price columns' decimal mark (None: each column's majority decides). ``download.policy`` (Python only) sets
    which addresses besides the public internet may be fetched (default: loopback and private networks yes,
    link-local and cloud metadata never).

    Raises PhivisionError for a table that cannot be used, a disk that cannot be written, or when no row
    survives (after writing the report).
    """
    start = time.perf_counter()
    sources, out, download, prices = [str(s) for s in args.source], args.out, args.download, args.prices
    ratios = split_ratios(args.split)
    identity = dataset_identity("prepare", sources)
    build = claim_out(
        out, identity, sources, args.overwrite
    )  # out, or beside it when replacing another dataset

    rows, dropped, per_source, price_report, image_rows, refused = read_sources(sources, args)
    rows, duplicate_drops, conflicts = drop_duplicates(rows)
    dropped += duplicate_drops
    if args.columns.group_by_code:
        rows, more_drops, more_refused = merge_products(rows, image_rows)
        dropped += more_drops
        refused += more_refused
    # the tables are good: mark the directory as this dataset's before the first image lands in it
    if not (build / REPORT_FILE).exists():
        atomic_write_json(
            build / REPORT_FILE, {"dataset": identity, "status": "downloading", "sources": per_source}
        )

    # one download per unique URL, named after the first product that uses it
    jobs: dict[str, str] = {}
    for code, photos in zip(rows["product_code"], rows["_photos"], strict=True):
        for photo in photos:
            jobs.setdefault(photo.url, file_stem(code, photo.url))
    fetched, stats = download_images(jobs, build / IMAGES_DIR, download, progress=args.progress)
    outcome = keep_valid_photos(rows, fetched, IMAGES_DIR)
    refused += outcome.dropped_photos
    for position, (why, detail) in outcome.product_reasons.items():
        dropped += _dropped_product(rows.iloc[position], why, detail)
    ok = pd.Series([paths is not None for paths in outcome.paths], index=rows.index, dtype=bool)
    catalog = rows[ok].reset_index(drop=True)
    kept_paths = [paths for paths in outcome.paths if paths is not None]
    catalog.insert(5, "image_path", [paths[0] for paths in kept_paths])
    order = {source: k for k, source in enumerate(sources)}
    dropped.sort(key=lambda d: (order[d["source"]], d["row"]))
    refused.sort(key=lambda d: (order[d["source"]], d["row"]))

    report = _report(out, identity, per_source, rows_in=sum(s["rows"] for s in per_source), dropped=dropped)
    report["prices"] = price_report
    report["conflicts"] = conflicts
    report["images"] = {**_image_report(jobs, fetched, stats), **photos_report(kept_paths, refused)}
    report["dropped_images"] = refused
    report["options"] = {
        "columns": args.columns.by_field(),
        "currency": prices.currency,
        "decimal_comma": prices.decimal_comma,
        "max_price": prices.max_price,
        "split": list(ratios),
        "seed": args.seed,
        "limit": args.limit,
        "download": {k: v for k, v in asdict(download).items() if k != "policy"},
        "address_policy": asdict(download.policy),
    }
    if catalog.empty:
        report["seconds"] = round(time.perf_counter() - start, 3)
        atomic_write_json(build / REPORT_FILE, report)
        raise PhivisionError(f"no product survived cleaning and download; see {build / REPORT_FILE}")

    catalog.insert(6, "split", assign_splits(catalog, ratios, seed=args.seed))
    catalog.insert(7, IMAGE_PATHS, pd.Series(kept_paths, dtype=object))
    dropped_counts = Counter(d["source"] for d in dropped)
    for entry in per_source:
        entry["kept"] = entry["rows"] - dropped_counts[entry["source"]]
    catalog = catalog.drop(columns=[c for c in INTERNAL_COLUMNS if c in catalog.columns])
    report["products"] = len(catalog)
    report["splits"] = {s: int((catalog["split"] == s).sum()) for s in SPLITS}
    report["categories"] = {
        str(k): int(v) for k, v in catalog["category"].value_counts().sort_index().items()
    }
    report["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_parquet(build / CATALOG_FILE, catalog)
    atomic_write_json(build / REPORT_FILE, report)
    finish_out(out, build)
    return report


def read_sources(
    sources: Sequence[str], args: PrepareArgs
) -> tuple[pd.DataFrame, list[dict], list[dict], dict, pd.DataFrame, list[dict]]:
    """Read, check and clean every source (all of them before any download). Returns the usable rows, the
    dropped rows, the per-source counts, the per-source price reading, the image rows (``group_by_code``) and
    the photos refused in dropped rows (see :func:`clean_rows`)."""
    kept, dropped, per_source, prices, image_rows, refused = [], [], [], {}, [], []
    limit, price = args.limit, args.prices
    for order, source in enumerate(sources):
        frame = read_source(source, args.hub_split, args.hub_config, args.revision)
        if limit is not None:
            lines = frame.attrs.get("line_numbers")
            frame = frame.head(limit)
            if lines is not None:
                frame.attrs["line_numbers"] = lines[:limit]
        good, bad, price_entry, extra, bad_photos = clean_rows(
            frame,
            source,
            args.columns,
            price.currency,
            args.download.allow_local,
            price.decimal_comma,
            price.max_price,
        )
        kept.append(good.assign(_order=order))
        image_rows.append(extra.assign(_order=order))
        dropped += bad
        refused += bad_photos
        per_source.append({"source": source, "rows": len(frame)})
        prices[source] = price_entry
    return (
        normalise_types(pd.concat(kept, ignore_index=True)),
        dropped,
        per_source,
        prices,
        pd.concat(image_rows, ignore_index=True),
        refused,
    )


def drop_duplicates(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], dict]:
    """Exact copies first (``duplicate_row``, the first one kept), then conflicting duplicates by the rule of
    :mod:`phivision.data.duplicates` (same product code, then same image URL: a photo listed for several
    products). Returns the rows kept, the dropped rows and the report's ``conflicts`` entry."""
    photo_urls = rows["_photos"].map(lambda photos: tuple(p.url for p in photos))
    copy = rows.assign(_urls=photo_urls).duplicated(
        ["product_code", "title", "full_price", "currency", "_urls"]
    )
    dropped = [_dropped(row, "duplicate_row", row["_url"]) for _, row in rows[copy].iterrows()]
    rows = rows[~copy]
    keep, details, groups = resolve_conflicts(rows, CONFLICT_KEYS[:1])
    photos = photo_table(rows[keep])
    photo_keep, photo_details, photo_groups = resolve_conflicts(photos, CONFLICT_KEYS[1:])
    for line in photos.index[~photo_keep]:
        index = photos.at[line, "_index"]
        keep[index] = False
        details.setdefault(index, photo_details[line])
    groups += photo_groups
    dropped += [
        _dropped(rows.loc[i], "conflicting_duplicate", rows.at[i, "_url"], details[i])
        for i in rows.index[~keep]
    ]
    conflicts = {"rule": CONFLICT_RULE}
    for column in CONFLICT_KEYS:
        mine = [g for g in groups if g.column == column]
        conflicts[column] = {
            "groups": len(mine),
            "rows": sum(len(g.rows) for g in mine),
            "dropped": sum(len(g.rows) - len(g.kept) for g in mine),
        }
    conflicts["groups"] = [g.as_dict() for g in groups]
    return rows[keep].reset_index(drop=True), dropped, conflicts


def merge_products(
    rows: pd.DataFrame, image_rows: pd.DataFrame
) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """``group_by_code``: the rows of one product code become one product (:func:`merge_rows_by_code`). Returns
    the products with at least one usable photo, the dropped rows (image rows without a product, products
    without a usable photo) and the photos left out so far."""
    products, refused = merge_rows_by_code(rows, image_rows)
    dropped = []
    orphans = image_rows[~image_rows["product_code"].isin(set(products["product_code"]))]
    for _, row in orphans.iterrows():
        detail = f"no kept row of product code {row['product_code']!r} holds its title, category and price"
        dropped.append(_dropped(row, "image_row_without_product", row["_url"], detail))
    bare = products["_photos"].map(len).eq(0)
    for _, product in products[bare].iterrows():
        why, detail = no_photo_reason(product["_problems"])
        dropped += _dropped_product(product, why, detail)
        refused += product["_problems"]
    return products[~bare].reset_index(drop=True), dropped, refused


def _image_report(jobs: dict, fetched: dict, stats) -> dict:
    return {
        "unique_urls": len(jobs),
        "downloaded": sum(r.status == "downloaded" for r in fetched.values()),
        "reused": sum(r.status == "reused" for r in fetched.values()),
        "failed": sum(r.status == "failed" for r in fetched.values()),
        "failed_by_reason": dict(
            Counter(r.reason for r in fetched.values() if r.status == "failed").most_common()
        ),
        "requests": stats.requests,
        "retries": stats.retries,
        "bytes": stats.bytes,
        "seconds": round(stats.seconds, 3),
    }


def _report(out: Path, identity: dict, per_source: list[dict], rows_in: int, dropped: list[dict]) -> dict:
    by_reason = Counter(d["reason"] for d in dropped)
    return {
        "dataset": identity,
        "status": "done",
        "sources": per_source,
        "out": str(out),
        "row_numbers": ROW_NUMBERS,
        "counts": {"rows": rows_in, "kept": rows_in - len(dropped), "dropped": len(dropped)},
        "dropped_by_reason": dict(by_reason.most_common()),
        "failed": dropped,
    }


def summary(report: dict) -> str:
    """One paragraph a person can read at the end of ``phivision prepare``."""
    counts, images = report["counts"], report["images"]
    reasons = ", ".join(f"{n} {r}" for r, n in report["dropped_by_reason"].items()) or "none"
    splits = report.get("splits", {})
    rate = images["downloaded"] / images["seconds"] if images["seconds"] > 0 else 0.0
    marks = [
        f"{source}: decimal {entry['decimal']} ({entry['decided_by']})"
        for source, entry in report.get("prices", {}).items()
        if entry.get("evidence", {}).get("comma") or entry["decided_by"] != "majority"
    ]
    products = report.get("products", counts["kept"])
    made = (
        f"{counts['kept']} of {counts['rows']} products"
        if products == counts["kept"]
        else f"{products} products from {counts['kept']} of {counts['rows']} rows"
    )
    per_product = {int(k): n for k, n in images.get("per_product", {}).items()}
    photos = ""
    if per_product and max(per_product) > 1:
        photos = (
            f"Photos: {images['in_catalog']} in the catalog, {min(per_product)} to {max(per_product)} per product "
            f"(mean {images['in_catalog'] / sum(per_product.values()):.1f}), {images['left_out']} left out "
            f"(listed in dropped_images). "
        )
    return (
        f"Prepared {made} from {len(report['sources'])} source(s) into "
        f"{report['out']} ({', '.join(f'{splits[s]} {s}' for s in SPLITS if s in splits)}). "
        f"Images: {images['downloaded']} downloaded ({rate:.1f}/s, {images['requests']} requests, "
        f"{images['retries']} retries), {images['reused']} reused from an earlier run, {images['failed']} failed. "
        + photos
        + (f"Prices: {'; '.join(marks)}. " if marks else "")
        + f"Dropped {counts['dropped']} rows ({reasons}); every dropped row is listed with its URL and reason in "
        f"{Path(report['out']) / REPORT_FILE}."
    )
