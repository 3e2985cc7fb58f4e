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
from phivision.data.download import download_images, file_stem, url_problem
from phivision.data.duplicates import resolve_conflicts
from phivision.data.layout import (
    CATALOG_FILE,
    IMAGES_DIR,
    REPORT_FILE,
    REQUIRED_COLUMNS,
    SPLITS,
    claim_out,
    dataset_identity,
    finish_out,
)
from phivision.data.prices import PLACEHOLDERS, Price, decide_convention, plain, read_price
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


def _text(value: object) -> str | None:
    """A cell as clean text, or None when empty or a placeholder such as ``N.A.``."""
    value = plain(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a code read as 1234.0 is "1234"
    text = str(value).strip()
    return None if text.lower() in PLACEHOLDERS else text


def _as_text_column(series: pd.Series) -> pd.Series:
    return pd.Series([_text(v) for v in series], index=series.index, dtype=object)


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
    options = dict(zip(fields, (f.name for f in dataclasses.fields(columns)), strict=True))  # field -> option
    if currency is not None:
        fields.pop("currency")
    for field, column in fields.items():
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
) -> tuple[pd.DataFrame, list[dict], dict]:
    """Map and clean one source's rows. Returns the usable rows (with ``_source``, ``_row``, ``_url``), one dict
    per dropped row with its reason, and the source's price-reading summary."""
    check_table(frame, label, columns, currency)
    _, numbers = row_numbers(frame)
    frame = frame.reset_index(drop=True)
    raw_urls = frame[columns.image_col]
    frame = normalise_types(frame, [c for f, c in columns.by_field().items() if f != "price"])
    currencies = (
        pd.Series(currency, index=frame.index) if currency is not None else frame[columns.currency_col]
    )
    prices, price_entry = read_prices(frame, label, columns.price_col, currencies, decimal_comma, max_price)
    out = frame.drop(columns=[c for c in REQUIRED_COLUMNS if c in frame.columns], errors="ignore")
    out.insert(0, "product_code", frame[columns.code_col])
    out.insert(1, "title", frame[columns.title_col])
    out.insert(2, "category", frame[columns.category_col])
    out.insert(3, "full_price", pd.Series([p.value for p in prices], index=frame.index, dtype="float64"))
    out.insert(4, "currency", currencies)
    out["_source"] = label
    out["_row"] = numbers
    out["_url"] = frame[columns.image_col]
    checks = [
        ("missing_product_code", out["product_code"].isna()),
        ("missing_title", out["title"].isna()),
        ("missing_category", out["category"].isna()),
        ("invalid_text", ~out[["product_code", "title", "category", "currency"]].map(_encodable).all(axis=1)),
        ("price", out["full_price"].isna()),
        ("missing_currency", out["currency"].isna()),
        ("url", out["_url"].map(lambda u: url_problem(u, allow_local) is not None)),
    ]
    reason = pd.Series(None, index=out.index, dtype=object)
    for name, mask in checks:  # the first failing check names the row's reason
        reason = reason.mask(reason.isna() & mask.to_numpy(), name)
    dropped = []
    for i in out.index[reason.notna()]:
        why, detail = reason[i], ""
        if why == "price":
            why, detail = prices[i].reason, prices[i].detail
        elif why == "url":
            why = url_problem(out.at[i, "_url"], allow_local)
            detail = "" if why == "missing_image_url" else "only http(s) URLs (and files with --allow-local)"
        dropped.append(_dropped(out.loc[i], why, raw_urls[i], detail))
    price_entry["dropped"] = dict(Counter(p.reason for p in prices if p.reason).most_common())
    return out[reason.isna()].reset_index(drop=True), dropped, price_entry


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

    rows, dropped, per_source, price_report = read_sources(sources, args)
    rows, duplicate_drops, conflicts = drop_duplicates(rows)
    dropped += duplicate_drops
    # the tables are good: mark the directory as this dataset's before the first image lands in it
    if not (build / REPORT_FILE).exists():
        atomic_write_json(
            build / REPORT_FILE, {"dataset": identity, "status": "downloading", "sources": per_source}
        )

    # one download per unique URL, named after the first product that uses it
    jobs: dict[str, str] = {}
    for code, url in zip(rows["product_code"], rows["_url"], strict=True):
        jobs.setdefault(url, file_stem(code, url))
    fetched, stats = download_images(jobs, build / IMAGES_DIR, download, progress=args.progress)
    ok = pd.Series([fetched[u].status != "failed" for u in rows["_url"]], index=rows.index, dtype=bool)
    for _, row in rows[~ok].iterrows():
        result = fetched[row["_url"]]
        dropped.append(_dropped(row, result.reason, row["_url"], result.detail))
    catalog = rows[ok].reset_index(drop=True)
    catalog.insert(5, "image_path", catalog["_url"].map(lambda u: f"{IMAGES_DIR}/{fetched[u].file}"))
    dropped.sort(key=lambda d: (sources.index(d["source"]), d["row"]))

    report = _report(out, identity, per_source, rows_in=sum(s["rows"] for s in per_source), dropped=dropped)
    report["prices"] = price_report
    report["conflicts"] = conflicts
    report["images"] = _image_report(jobs, fetched, stats)
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
    kept_counts = catalog["_source"].value_counts()
    for entry in per_source:
        entry["kept"] = int(kept_counts.get(entry["source"], 0))
    catalog = catalog.drop(columns=["_source", "_row", "_url"])
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
) -> tuple[pd.DataFrame, list[dict], list[dict], dict]:
    """Read, check and clean every source (all of them before any download). Returns the usable rows, the
    dropped rows, the per-source counts and the per-source price reading."""
    kept, dropped, per_source, prices = [], [], [], {}
    limit, price = args.limit, args.prices
    for source in sources:
        frame = read_source(source, args.hub_split, args.hub_config, args.revision)
        if limit is not None:
            lines = frame.attrs.get("line_numbers")
            frame = frame.head(limit)
            if lines is not None:
                frame.attrs["line_numbers"] = lines[:limit]
        good, bad, price_entry = clean_rows(
            frame,
            source,
            args.columns,
            price.currency,
            args.download.allow_local,
            price.decimal_comma,
            price.max_price,
        )
        kept.append(good)
        dropped += bad
        per_source.append({"source": source, "rows": len(frame)})
        prices[source] = price_entry
    return normalise_types(pd.concat(kept, ignore_index=True)), dropped, per_source, prices


def drop_duplicates(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], dict]:
    """Exact copies first (``duplicate_row``, the first one kept), then conflicting duplicates by the rule of
    :mod:`phivision.data.duplicates` (same product code, then same image URL). Returns the rows kept, the
    dropped rows and the report's ``conflicts`` entry."""
    copy = rows.duplicated(["product_code", "title", "full_price", "currency", "_url"])
    dropped = [_dropped(row, "duplicate_row", row["_url"]) for _, row in rows[copy].iterrows()]
    rows = rows[~copy]
    keep, details, groups = resolve_conflicts(rows.rename(columns={"_url": "image_url"}), CONFLICT_KEYS)
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
    return (
        f"Prepared {counts['kept']} of {counts['rows']} products from {len(report['sources'])} source(s) into "
        f"{report['out']} ({', '.join(f'{splits[s]} {s}' for s in SPLITS if s in splits)}). "
        f"Images: {images['downloaded']} downloaded ({rate:.1f}/s, {images['requests']} requests, "
        f"{images['retries']} retries), {images['reused']} reused from an earlier run, {images['failed']} failed. "
        + (f"Prices: {'; '.join(marks)}. " if marks else "")
        + f"Dropped {counts['dropped']} rows ({reasons}); every dropped row is listed with its URL and reason in "
        f"{Path(report['out']) / REPORT_FILE}."
    )
