"""``phivision prepare``: a product table (hub dataset, CSV, Parquet, JSONL) -> a local dataset directory.

Reads and checks every source first (a broken table fails before anything is downloaded), cleans rows (each
dropped row keeps its reason), downloads the images (see :mod:`phivision.data.download`), splits by category
without leaking title-sharing variants, and writes ``catalog.parquet`` and ``prepare_report.json`` atomically.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from phivision.data.download import DownloadConfig, download_images, file_stem, url_kind
from phivision.data.layout import CATALOG_FILE, IMAGES_DIR, REPORT_FILE, REQUIRED_COLUMNS, SPLITS
from phivision.data.split import assign_splits, parse_ratios
from phivision.errors import PhivisionError
from phivision.io import atomic_write_json, atomic_write_parquet
from phivision.prompt import parse_price

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson", ".json")
# values that catalogs put where a field is unknown; such rows are dropped with a reason, never kept
PLACEHOLDERS = {
    "",
    "n.a.",
    "n.a",
    "na",
    "n/a",
    "#n/a",
    "none",
    "null",
    "nan",
    "-",
    "--",
    "missing",
    "no image",
}


@dataclass(frozen=True)
class Columns:
    """Which source column holds each field. Defaults fit the DBQ ``<Brand>.Product.prices.<Country>`` sets."""

    title: str = "title"
    category: str = "category3_code"
    price: str = "full_price"
    image_url: str = "imageurl"
    product_code: str = "product_code"
    currency: str = "currency_code"

    def flags(self) -> dict[str, str]:
        """field -> the CLI flag that maps it (for error messages)."""
        return {
            "title": "--title-col",
            "category": "--category-col",
            "price": "--price-col",
            "image_url": "--image-col",
            "product_code": "--code-col",
            "currency": "--currency-col",
        }


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PhivisionError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
        ) from None
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise PhivisionError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise PhivisionError(f"{path} line {lineno}: invalid JSON ({err.msg})") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise PhivisionError(
            f"{path} row {bad + 1}: expected a JSON object, got {type(records[bad]).__name__}"
        )
    return pd.DataFrame.from_records(records)


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
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a code read as 1234.0 is "1234"
    text = str(value).strip()
    return None if text.lower() in PLACEHOLDERS else text


def _as_text_column(series: pd.Series) -> pd.Series:
    return pd.Series([_text(v) for v in series], index=series.index, dtype=object)


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


def check_table(frame: pd.DataFrame, label: str, columns: Columns, currency: str | None) -> None:
    """Whole-table mistakes that no row-by-row cleaning can fix: raise a one-line PhivisionError."""
    if len(frame) == 0:
        raise PhivisionError(f"{label}: empty table (no rows)")
    fields = asdict(columns)
    if currency is not None:
        fields.pop("currency")
    for field, column in fields.items():
        if column not in frame.columns:
            flag = columns.flags()[field]
            hint = " or pass --currency" if field == "currency" else ""
            raise PhivisionError(
                f"{label}: column '{column}' not found (set {flag}{hint}); columns: {', '.join(map(str, frame.columns))}"
            )
    prices = frame[columns.price]
    if not prices.map(parse_price).notna().any():
        raise PhivisionError(
            f"{label}: column '{columns.price}': no value parses as a price (row 1: {prices.iloc[0]!r})"
        )


def clean_rows(
    frame: pd.DataFrame, label: str, columns: Columns, currency: str | None, allow_local: bool
) -> tuple[pd.DataFrame, list[dict]]:
    """Map and clean one source's rows. Returns the usable rows (with ``_source``, ``_row``, ``_url``) and one
    dict per dropped row with its reason."""
    check_table(frame, label, columns, currency)
    raw_urls = frame[columns.image_url].reset_index(drop=True)
    frame = normalise_types(
        frame.reset_index(drop=True), [c for f, c in asdict(columns).items() if f != "price"]
    )
    out = frame.drop(columns=[c for c in REQUIRED_COLUMNS if c in frame.columns], errors="ignore")
    out.insert(0, "product_code", frame[columns.product_code])
    out.insert(1, "title", frame[columns.title])
    out.insert(2, "category", frame[columns.category])
    out.insert(3, "full_price", frame[columns.price].map(parse_price).astype("float64"))
    out.insert(4, "currency", currency if currency is not None else frame[columns.currency])
    out["_source"] = label
    out["_row"] = range(1, len(frame) + 1)
    out["_url"] = frame[columns.image_url]
    checks = [
        ("missing_product_code", out["product_code"].isna()),
        ("missing_title", out["title"].isna()),
        ("missing_category", out["category"].isna()),
        ("bad_price", out["full_price"].isna()),
        ("missing_currency", out["currency"].isna()),
        ("missing_image_url", out["_url"].isna()),
        (
            "unsupported_url",
            out["_url"].map(lambda u: isinstance(u, str) and url_kind(u, allow_local) is None),
        ),
    ]
    reason = pd.Series(None, index=out.index, dtype=object)
    for name, mask in checks:  # the first failing check names the row's reason
        reason = reason.mask(reason.isna() & mask.to_numpy(), name)
    dropped = [_dropped(row, reason[i], raw_urls[i]) for i, row in out[reason.notna()].iterrows()]
    return out[reason.isna()].reset_index(drop=True), dropped


def _dropped(row: pd.Series, reason: str, url: object = None, detail: str = "") -> dict:
    return {
        "source": row["_source"],
        "row": int(row["_row"]),
        "product_code": row["product_code"],
        "url": None if url is None or (isinstance(url, float) and math.isnan(url)) else str(url),
        "reason": reason,
        "detail": detail,
    }


# ------------------------------------------------------------------------------------------------ pipeline


def prepare(
    sources: Sequence[str],
    out: str | Path,
    columns: Columns = Columns(),
    currency: str | None = None,
    hub_split: str | None = "train",
    hub_config: str | None = None,
    revision: str | None = None,
    split: str | Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    download: DownloadConfig | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Build the dataset in ``out`` from one or more sources and return the report (also written to
    ``out/prepare_report.json``). Rerunning with the same arguments reuses every image already downloaded.

    Raises PhivisionError for a table that cannot be used, or when no row survives (after writing the report).
    """
    start = time.perf_counter()
    if not sources:
        raise PhivisionError("--source: give at least one table or hub dataset")
    ratios = parse_ratios(split)
    download = download or DownloadConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhivisionError(f"--out {out}: exists and is not a directory")

    kept, dropped, per_source = [], [], []
    for source in sources:
        frame = read_source(source, hub_split, hub_config, revision)
        if limit is not None:
            frame = frame.head(limit)
        good, bad = clean_rows(frame, source, columns, currency, download.allow_local)
        kept.append(good)
        dropped += bad
        per_source.append({"source": source, "rows": len(frame)})
    rows = normalise_types(pd.concat(kept, ignore_index=True))
    duplicate = rows.duplicated(["product_code", "title", "full_price", "currency", "_url"])
    dropped += [_dropped(row, "duplicate_row", row["_url"]) for _, row in rows[duplicate].iterrows()]
    rows = rows[~duplicate].reset_index(drop=True)

    # one download per unique URL, named after the first product that uses it
    jobs: dict[str, str] = {}
    for code, url in zip(rows["product_code"], rows["_url"], strict=True):
        jobs.setdefault(url, file_stem(code, url))
    fetched, stats = download_images(jobs, out / IMAGES_DIR, download, progress=progress)
    ok = pd.Series([fetched[u].status != "failed" for u in rows["_url"]], index=rows.index, dtype=bool)
    for _, row in rows[~ok].iterrows():
        result = fetched[row["_url"]]
        dropped.append(_dropped(row, result.reason, row["_url"], result.detail))
    catalog = rows[ok].reset_index(drop=True)
    catalog.insert(5, "image_path", catalog["_url"].map(lambda u: f"{IMAGES_DIR}/{fetched[u].file}"))
    dropped.sort(key=lambda d: (sources.index(d["source"]), d["row"]))

    report = _report(sources, out, per_source, rows_in=sum(s["rows"] for s in per_source), dropped=dropped)
    report["images"] = {
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
    if catalog.empty:
        report["seconds"] = round(time.perf_counter() - start, 3)
        atomic_write_json(out / REPORT_FILE, report)
        raise PhivisionError(f"no product survived cleaning and download; see {out / REPORT_FILE}")

    catalog.insert(6, "split", assign_splits(catalog, ratios, seed=seed))
    catalog = catalog.drop(columns=["_source", "_row", "_url"])
    kept_counts = rows.loc[ok, "_source"].value_counts()
    for source in per_source:
        source["kept"] = int(kept_counts.get(source["source"], 0))
    report["splits"] = {s: int((catalog["split"] == s).sum()) for s in SPLITS}
    report["categories"] = {
        str(k): int(v) for k, v in catalog["category"].value_counts().sort_index().items()
    }
    report["options"] = {
        "columns": asdict(columns),
        "currency": currency,
        "split": list(ratios),
        "seed": seed,
        "download": asdict(download),
    }
    report["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_parquet(out / CATALOG_FILE, catalog)
    atomic_write_json(out / REPORT_FILE, report)
    return report


def _report(
    sources: Sequence[str], out: Path, per_source: list[dict], rows_in: int, dropped: list[dict]
) -> dict:
    by_reason = Counter(d["reason"] for d in dropped)
    return {
        "sources": per_source,
        "out": str(out),
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
    return (
        f"Prepared {counts['kept']} of {counts['rows']} products from {len(report['sources'])} source(s) into "
        f"{report['out']} ({', '.join(f'{splits[s]} {s}' for s in SPLITS if s in splits)}). "
        f"Images: {images['downloaded']} downloaded ({rate:.1f}/s, {images['requests']} requests, "
        f"{images['retries']} retries), {images['reused']} reused from an earlier run, {images['failed']} failed. "
        f"Dropped {counts['dropped']} rows ({reasons}); every dropped row is listed with its URL and reason in "
        f"{Path(report['out']) / REPORT_FILE}."
    )
