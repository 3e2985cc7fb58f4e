"""One self-contained HTML report from evaluation outputs: tables, plots and a gallery, all embedded.

Reads ``metrics.json`` + ``predictions.jsonl`` pairs (as written by :func:`phivision.evaluate.evaluate`), either
every stage under ``RUN/eval/`` (``before``, ``after``, ...) or one predictions file. Plots are drawn with
matplotlib's Agg canvas and embedded as base64 PNG, thumbnails as base64 JPEG: the file opens anywhere, offline,
and runs no script.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from phivision.data.images import ImageError, load_image
from phivision.errors import PhivisionError
from phivision.evaluate.evaluation import EVAL_DIR, METRICS_FILE, PREDICTIONS_FILE
from phivision.evaluate.metrics import (
    HEADLINE,
    LOWER_IS_BETTER,
    format_value,
    normalize_label,
    per_category,
    summarize,
)
from phivision.io import atomic_write_text

STAGE_ORDER = ("before", "after")

GALLERY_SIZE = 9  # three rows of three cards at the page width
THUMBNAIL_PX = 192
CONFUSION_MAX = 15


@dataclass
class Stage:
    """One evaluation: its name, metrics and per-item records."""

    name: str
    metrics: dict
    records: list[dict]


# ---------------------------------------------------------------------------------------------- inputs


def read_predictions(path: Path) -> list[dict]:
    """Read predictions.jsonl; a broken line is a user error naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PhivisionError(f"{path} line {number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise PhivisionError(f"{path} line {number}: expected a JSON object")
            missing = [k for k in ("truth", "parsed", "errors") if k not in record]
            if missing:
                raise PhivisionError(f"{path} line {number}: missing key(s) {', '.join(missing)}")
            records.append(record)
    if not records:
        raise PhivisionError(f"{path}: no predictions")
    return records


def load_stage(predictions: str | os.PathLike, name: str | None = None) -> Stage:
    """A predictions file and the metrics.json beside it (recomputed from the records if that is missing)."""
    path = Path(predictions)
    if not path.is_file():
        raise PhivisionError(f"{path}: not found")
    records = read_predictions(path)
    metrics_path = path.parent / METRICS_FILE
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PhivisionError(f"{metrics_path}: not JSON ({err.msg})") from None
    else:
        metrics = summarize(records)
    return Stage(name or path.parent.name, metrics, records)


def load_run(run: str | os.PathLike) -> list[Stage]:
    """Every ``RUN/eval/<stage>/predictions.jsonl``: before, after, then any others by name."""
    root = Path(run) / EVAL_DIR
    found = sorted(p.parent.name for p in root.glob(f"*/{PREDICTIONS_FILE}")) if root.is_dir() else []
    if not found:
        raise PhivisionError(
            f"{root}: no evaluation found (write one with `phivision evaluate --model {run} --data DIR "
            f"--out {root}/after/{METRICS_FILE}`)"
        )
    ordered = [s for s in STAGE_ORDER if s in found] + [s for s in found if s not in STAGE_ORDER]
    return [load_stage(root / s / PREDICTIONS_FILE, s) for s in ordered]


# ----------------------------------------------------------------------------------------------- plots


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def price_scatter(records: list[dict]) -> str:
    """Predicted against true price on log-log axes, with the line of perfect answers."""
    pairs = [(r["truth"]["price"], r["parsed"]["price"]) for r in records if r["parsed"]["price"] is not None]
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    if pairs:
        true, pred = zip(*pairs, strict=True)
        ax.scatter(true, pred, s=14, alpha=0.6, color="#2563eb", edgecolors="none")
        low, high = min(min(true), min(pred)) / 1.5, max(max(true), max(pred)) * 1.5
        ax.plot([low, high], [low, high], color="#9ca3af", lw=1, ls="--", label="perfect")
        ax.fill_between(
            [low, high], [low * 0.9, high * 0.9], [low * 1.1, high * 1.1], color="#16a34a", alpha=0.12
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.legend(loc="upper left", frameon=False)
    else:
        ax.text(0.5, 0.5, "no answer had a readable price", ha="center", va="center", transform=ax.transAxes)
    missing = len(records) - len(pairs)
    ax.set_title(f"price: predicted vs true ({missing} without a price not shown)", fontsize=10)
    ax.set_xlabel("true price")
    ax.set_ylabel("predicted price")
    ax.grid(True, which="major", alpha=0.3)
    return _png(fig)


def error_histogram(records: list[dict]) -> str:
    """Signed log10 price error (0 = exact, +1 = ten times too high); missing prices counted in the title."""
    errors = [
        math.log10(r["parsed"]["price"] / r["truth"]["price"])
        for r in records
        if r["parsed"]["price"] is not None
    ]
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    if errors:
        ax.hist(errors, bins=min(40, max(10, len(errors) // 4)), color="#2563eb", alpha=0.85)
        ax.axvline(0, color="#111827", lw=1)
        ax.axvspan(math.log10(0.9), math.log10(1.1), color="#16a34a", alpha=0.15, label="within 10%")
        ax.legend(loc="upper right", frameon=False)
    else:
        ax.text(0.5, 0.5, "no answer had a readable price", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"log10(predicted / true price); {len(records) - len(errors)} missing", fontsize=10)
    ax.set_xlabel("log10 error (0 = exact)")
    ax.set_ylabel("items")
    return _png(fig)


def confusion_matrix(records: list[dict]) -> str:
    """Counts of true (rows) against predicted (columns) category; the rarest classes are pooled in (other)."""
    names: dict[str, str] = {}
    for r in records:
        names.setdefault(normalize_label(r["truth"]["category"]), r["truth"]["category"])
    counts = Counter(normalize_label(r["truth"]["category"]) for r in records)
    top = sorted(counts, key=lambda c: (-counts[c], c))[:CONFUSION_MAX]
    rows = [*top, "(other)"] if len(counts) > len(top) else top
    cols = [*top, "(other)", "(none)"]

    def bucket(label: str | None) -> str:
        if label is None:
            return "(none)"
        label = normalize_label(label)
        return label if label in top else "(other)"

    grid = [[0] * len(cols) for _ in rows]
    for r in records:
        grid[rows.index(bucket(r["truth"]["category"]))][cols.index(bucket(r["parsed"]["category"]))] += 1
    keep = [j for j, c in enumerate(cols) if c in top or any(row[j] for row in grid)]
    cols = [cols[j] for j in keep]
    grid = [[row[j] for j in keep] for row in grid]
    size = 2.8 + 0.38 * max(len(rows), len(cols))
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    top_value = max(max(row) for row in grid) or 1
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value:
                color = "white" if value > top_value / 2 else "#111827"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(cols)), [names.get(c, c)[:24] for c in cols], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [names.get(c, c)[:24] for c in rows], fontsize=8)
    ax.set_xlabel("predicted category")
    ax.set_ylabel("true category")
    ax.set_title("category confusion matrix", fontsize=10)
    return _png(fig)


# --------------------------------------------------------------------------------------------- gallery


def item_loss(record: dict) -> float:
    """Ranks the gallery: log price error + 1 for a wrong category + (1 - title similarity); unparsed items first."""
    e = record["errors"]
    return (
        e["price_log_error"]
        + (not e["category_correct"])
        + (1.0 - e["title_similarity"])
        + (not e["complete"])
    )


def thumbnail(path: str | None) -> str | None:
    """A small base64 JPEG of the item's image, or None when the file is gone or unreadable."""
    if not path or not Path(path).is_file():
        return None
    try:
        image = load_image(path)
    except ImageError:
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery(records: list[dict], best: bool) -> list[dict]:
    """The GALLERY_SIZE best or worst items as template-ready cards."""
    ranked = sorted(range(len(records)), key=lambda i: (item_loss(records[i]), i), reverse=not best)
    cards = []
    for i in ranked[:GALLERY_SIZE]:
        r = records[i]
        cards.append(
            {
                "id": r.get("id", str(i)),
                "image": thumbnail(r.get("image")),
                "truth": r["truth"],
                "parsed": r["parsed"],
                "answer": r.get("answer", ""),
                "errors": r["errors"],
                "price": _money(r["parsed"]["price"]),
                "true_price": _money(r["truth"]["price"]),
            }
        )
    return cards


# ---------------------------------------------------------------------------------------------- tables


def _money(value: float | None) -> str:
    return "none" if value is None else f"{value:,.2f}"


def headline_table(stages: list[Stage]) -> dict:
    """Rows of metric values, one column per stage plus the train baseline when metrics.json carries it.

    Each row marks its best value (lowest for errors, highest otherwise); the item count is not ranked.
    """
    columns = [(s.name, s.metrics) for s in stages]
    baseline = stages[-1].metrics.get("baseline")
    if baseline:
        columns.append(("baseline (train median / majority)", baseline))
    rows = []
    for key, label, kind in HEADLINE:
        values = [m.get(key) for _, m in columns]
        known = [v for v in values if v is not None]
        if not known:
            continue
        best = None if key == "n" or len(known) < 2 else (min if key in LOWER_IS_BETTER else max)(known)
        cells = [{"text": format_value(v, kind), "best": v is not None and v == best} for v in values]
        rows.append({"label": label, "lower_better": key in LOWER_IS_BETTER, "cells": cells})
    return {"columns": [name for name, _ in columns], "rows": rows}


def category_table(stage: Stage) -> list[dict]:
    table = stage.metrics.get("per_category") or per_category(stage.records)
    return [
        {
            "category": cat,
            "n": row["n"],
            "accuracy": format_value(row["accuracy"], "pct"),
            "mape": format_value(row["price_mape"], "pct"),
        }
        for cat, row in table.items()
    ]


# ---------------------------------------------------------------------------------------------- render


def render_report(stages: list[Stage], title: str = "phivision evaluation report") -> str:
    """The report's HTML: headline over all stages, plots, tables and gallery for the last one."""
    if not stages:
        raise ValueError("no evaluation to report")
    final = stages[-1]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("phivision.evaluate", "templates"),
        autoescape=jinja2.select_autoescape(["html", "jinja"], default=True),
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.jinja").render(
        title=title,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        stages=[s.name for s in stages],
        final=final.name,
        headline=headline_table(stages),
        scoring=final.metrics.get("scoring", {}),
        scatter=price_scatter(final.records),
        histogram=error_histogram(final.records),
        confusion=confusion_matrix(final.records),
        categories=category_table(final),
        best=gallery(final.records, best=True),
        worst=gallery(final.records, best=False),
        source=str(final.metrics.get("model", "")),
    )


def write_report(
    run: str | os.PathLike | None = None,
    predictions: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Render the report for a RUN (all its eval stages) or one predictions file, and write it atomically.

    ``out`` defaults to ``RUN/report.html`` or ``report.html`` beside the predictions file.
    """
    if (run is None) == (predictions is None):
        raise PhivisionError("give exactly one of --run or --predictions")
    if run is not None:
        stages = load_run(run)
        out = Path(out) if out is not None else Path(run) / "report.html"
        title = f"phivision report: {Path(run).resolve().name}"
    else:
        stages = [load_stage(predictions)]
        out = Path(out) if out is not None else Path(predictions).parent / "report.html"
        title = f"phivision report: {Path(predictions).resolve().parent.name}"
    return atomic_write_text(out, render_report(stages, title=title))
