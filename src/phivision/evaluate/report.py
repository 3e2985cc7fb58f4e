"""One self-contained HTML report from evaluation outputs and the training run around them.

Reads ``metrics.json`` + ``predictions.jsonl`` pairs (as written by :func:`phivision.evaluate.evaluate`), either
every stage under ``RUN/eval/`` (``before``, ``after``, ...) or one predictions file, and for a RUN also its
``metrics.jsonl``, ``trainer_state.json`` and ``config.yaml``. The page holds: the headline table with bootstrap
95% intervals and the paired change between the first and last stage, the dataset and the run's config, training
curves, price plots, breakdowns by price band and by category (stages side by side), and the best and worst
answers with their photos. Plots are embedded as base64 PNG, thumbnails as base64 JPEG: the file opens anywhere,
offline, and runs no script.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from phivision.args import ReportArgs
from phivision.data.layout import RunLayout
from phivision.data.pages import thumbnail_uri
from phivision.errors import PhivisionError
from phivision.evaluate import bootstrap, report_plots
from phivision.evaluate.metrics import (
    HEADLINE,
    TRAINING_EVAL,
    ItemScores,
    best_cells,
    format_value,
    group_metrics,
    higher_is_better,
)
from phivision.evaluate.report_inputs import (
    DatasetSummary,
    Stage,
    TrainingLog,
    load_run,
    load_stage,
    read_training_log,
    summarize_dataset,
)
from phivision.io import atomic_write_text

__all__ = ["GALLERY_SIZE", "Stage", "load_run", "load_stage", "render_report", "write_report"]

GALLERY_SIZE = 9  # three rows of three cards at the page width
THUMBNAIL_PX = 192
CATEGORY_ROWS = 20  # categories listed one by one in the breakdown; the rest share one row
PRICE_BANDS = 4  # quantiles of the true price
BREAKDOWN = (
    ("price_mape", "price MAPE"),
    ("price_smape", "price SMAPE"),
    ("price_within_10pct", "price within 10%"),
    ("category_accuracy", "category accuracy"),
)
EVAL_CURVES = (
    ("parse_rate", "answers fully parsed"),
    ("category_accuracy", "category accuracy"),
    ("price_within_10pct", "price within 10%"),
    ("price_smape", "price SMAPE"),
)
RUN_FACTS = (
    ("base model", "model"),
    ("method", "method"),
    ("precision", "precision"),
    ("seed", "seed"),
    ("dataset", "data.path"),
    ("batch size per device", "data.batch_size"),
    ("gradient accumulation", "optim.grad_accum"),
    ("learning rate", "optim.lr"),
    ("epochs", "schedule.epochs"),
    ("max steps (0: from epochs)", "schedule.max_steps"),
    ("LoRA rank", "lora.r"),
)
KINDS = {key: kind for key, _, kind in (*HEADLINE, *TRAINING_EVAL)}
LABELS = {key: label for key, label, _ in (*HEADLINE, *TRAINING_EVAL)}


# ---------------------------------------------------------------------------------------------- cells


def money(value: float | None, currency: str | None) -> str:
    """A price as shown in tables: separators, cents below 100, and the currency code."""
    if value is None:
        return "none"
    text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{text} {currency}" if currency else text


def interval_text(interval: tuple[float, float] | None, kind: str) -> str:
    if interval is None:
        return ""
    return f"{format_value(interval[0], kind)} – {format_value(interval[1], kind)}"


def change_text(value: float, kind: str) -> str:
    """A difference between stages: percentage points for rates, plain numbers otherwise."""
    if kind == "pct":
        return f"{100 * value:+.1f} pp"
    if kind == "price":
        return f"{value:+,.2f}"
    return f"{value:+,.3f}"


def change_cell(key: str, point: float | None, interval: tuple[float, float] | None) -> dict:
    """The paired change of one metric with its interval and a verdict: better, worse or unclear."""
    kind = KINDS.get(key, "num")
    if point is None or interval is None:
        return {"text": "", "interval": "", "verdict": ""}
    low, high = interval
    verdict = "unclear"
    better = higher_is_better(key)
    if better is not None and (low > 0 or high < 0):
        verdict = "better" if (low > 0) == better else "worse"
    return {
        "text": change_text(point, kind),
        "interval": f"{change_text(low, kind)} to {change_text(high, kind)}",
        "verdict": verdict,
    }


# ------------------------------------------------------------------------------------------ headline


def _aligned(first: Stage, last: Stage) -> list[dict] | None:
    """``last``'s records in ``first``'s item order when both hold the same items (by id), else None."""
    ids = [r.get("id") for r in first.records]
    index = {r.get("id"): r for r in last.records}
    if (
        None in index
        or len(index) != len(last.records)
        or len(set(ids)) != len(ids)
        or set(ids) != set(index)
    ):
        return None
    return [index[i] for i in ids]


def uncertainty(stages: list[Stage], resamples: int, seed: int, notes: list[str]) -> tuple[list[dict], dict]:
    """Bootstrap intervals for each stage and for the change from the first stage to the last.

    Stages holding the same items share their resamples, so the change is a paired comparison.
    """
    if resamples == 0:
        return [{} for _ in stages], {}
    aligned = _aligned(stages[0], stages[-1]) if len(stages) > 1 else None
    if len(stages) > 1 and aligned is None:
        notes.append(
            f"stages {stages[0].name} and {stages[-1].name} were not scored on the same items, "
            "so the report shows no paired change between them"
        )
    per_stage, change = [], {}
    if aligned is not None:
        first, last = bootstrap.replicates(
            [ItemScores.from_records(stages[0].records), ItemScores.from_records(aligned)], resamples, seed
        )
        change = bootstrap.intervals({k: last[k] - first[k] for k in first if k in last})
    for stage in stages:
        (replicated,) = bootstrap.replicates([ItemScores.from_records(stage.records)], resamples, seed)
        per_stage.append(bootstrap.intervals(replicated))
    return per_stage, change


def headline_table(
    stages: list[Stage], resamples: int, seed: int, notes: list[str], currency: str | None = None
) -> dict:
    """Rows of metric values with intervals, one column per stage plus the train baseline when metrics.json
    carries it, and the paired change from the first stage to the last. Best cells by :func:`best_cells`."""
    columns = [(s.name, s.metrics) for s in stages]
    baseline = stages[-1].metrics.get("baseline")
    if isinstance(baseline, dict) and baseline:
        columns.append(("baseline", baseline))
    per_stage, change = uncertainty(stages, resamples, seed, notes)
    intervals = [*per_stage, {}]  # the baseline has no per-item records here
    show_change = len(stages) > 1 and bool(change)
    rows = []
    for key, label, kind in HEADLINE:
        values = [m.get(key) for _, m in columns]
        if all(v is None for v in values):
            continue
        best = best_cells(values, key, kind)
        cells = [
            {"text": format_value(v, kind), "interval": interval_text(iv.get(key), kind), "best": b}
            for v, iv, b in zip(values, intervals, best, strict=False)
        ]
        first, last = stages[0].metrics.get(key), stages[-1].metrics.get(key)
        point = None if first is None or last is None else last - first
        rows.append(
            {
                "key": key,
                "label": f"{label} ({currency})" if kind == "price" and currency else label,
                "hint": {True: "higher is better", False: "lower is better", None: ""}[higher_is_better(key)],
                "cells": cells,
                "change": change_cell(key, point, change.get(key)) if show_change else None,
            }
        )
    change_label = f"{stages[-1].name} − {stages[0].name}" if show_change else None
    return {
        "columns": [name for name, _ in columns],
        "rows": rows,
        "change_label": change_label,
        "baseline": len(columns) > len(stages),
    }


def stage_table(stages: list[Stage]) -> list[dict]:
    return [
        {
            "name": s.name,
            "model": str(s.metrics.get("model", "")),
            "split": str(s.metrics.get("split", "")),
            "items": len(s.records),
            "image_errors": sum(1 for r in s.records if r.get("image_error")),
        }
        for s in stages
    ]


# ---------------------------------------------------------------------------------------- breakdowns


def breakdown_table(stages: list[Stage], groups_of: list[np.ndarray], labels: list[str]) -> dict:
    """Per-group metrics (rows) for every stage side by side; ``groups_of[s][i]`` is item i's group in stage s."""
    computed = [
        group_metrics(ItemScores.from_records(stage.records), groups, len(labels))
        for stage, groups in zip(stages, groups_of, strict=True)
    ]
    rows = []
    for g, label in enumerate(labels):
        metrics = []
        for key, _ in BREAKDOWN:
            kind = KINDS[key]
            values = [None if np.isnan(c[key][g]) else float(c[key][g]) for c in computed]
            best = best_cells(values, key, kind)
            metrics.append(
                [{"text": format_value(v, kind), "best": b} for v, b in zip(values, best, strict=True)]
            )
        items = [int(c["n"][g]) for c in computed]
        rows.append({"label": label, "items": items[-1], "metrics": metrics})
    return {"stages": [s.name for s in stages], "metrics": [label for _, label in BREAKDOWN], "rows": rows}


def price_band_table(stages: list[Stage], currency: str | None) -> dict:
    """Metrics by quartile of the true price (edges from the last stage's items), stages side by side."""
    prices = np.array([r["truth"]["price"] for r in stages[-1].records])
    edges = np.unique(np.quantile(prices, np.linspace(0, 1, PRICE_BANDS + 1)[1:-1]))
    edges = edges[edges < prices.max()]  # few distinct prices: fewer bands, none of them empty
    bounds = [float(prices.min()), *edges.tolist(), float(prices.max())]
    labels = []
    for i in range(len(bounds) - 1):
        low, high = money(bounds[i], currency), money(bounds[i + 1], currency)
        labels.append(f"up to {high}" if i == 0 else f"over {low}, up to {high}")
    groups_of = [
        np.searchsorted(edges, [r["truth"]["price"] for r in s.records], side="left").astype(np.int64)
        for s in stages
    ]
    return breakdown_table(stages, groups_of, labels)


def category_breakdown_table(stages: list[Stage]) -> dict:
    """Metrics per true category (largest first, the smallest pooled in one row), stages side by side."""
    counts: dict[str, int] = {}
    for r in stages[-1].records:
        counts[r["truth"]["category"]] = counts.get(r["truth"]["category"], 0) + 1
    ordered = sorted(counts, key=lambda c: (-counts[c], c))
    shown = ordered[:CATEGORY_ROWS]
    labels = list(shown)
    if len(ordered) > len(shown):
        labels.append(f"({len(ordered) - len(shown)} other categories)")
    index = {c: i for i, c in enumerate(shown)}
    pooled = len(shown) if len(ordered) > len(shown) else -1
    groups_of = [
        np.array([index.get(r["truth"]["category"], pooled) for r in s.records], dtype=np.int64)
        for s in stages
    ]
    return breakdown_table(stages, groups_of, labels)


# ------------------------------------------------------------------------------------------ training


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def run_facts(log: TrainingLog) -> list[tuple[str, str]]:
    """The run's key settings (from config.yaml) and progress (from trainer_state.json) as label/value rows."""
    facts = []
    config = log.config or {}
    for label, dotted in RUN_FACTS:
        value = _lookup(config, dotted)
        if value is None or value == "" or (dotted.startswith("lora.") and config.get("method") == "full"):
            continue
        facts.append((label, str(value)))
    state = log.state
    if "step" in state:
        total = f" of {state['total_steps']}" if "total_steps" in state else ""
        status = "finished" if state.get("done") else "not finished"
        if state.get("stopped_early"):
            status = "stopped early"
        facts.append(("optimizer steps", f"{state['step']:,}{total} ({status})"))
    if "best_metric" in state and "metric" in state:
        where = f" at step {state['best_step']:,}" if "best_step" in state else ""
        kind = KINDS.get(state["metric"], "num")
        facts.append((f"best {state['metric']}", f"{format_value(state['best_metric'], kind)}{where}"))
    return facts


def eval_table(evals: list[dict]) -> dict:
    """Every evaluation logged during training, one row per step, best value of each column highlighted."""
    keys = [k for k, _, _ in (*TRAINING_EVAL, *HEADLINE) if k != "n" and any(k in r for r in evals)]
    columns = []
    for key in keys:
        values = [r.get(key) for r in evals]
        best = best_cells(values, key, KINDS[key])
        columns.append(
            [{"text": format_value(v, KINDS[key]), "best": b} for v, b in zip(values, best, strict=True)]
        )
    rows = [{"step": f"{r['step']:,}", "cells": [col[i] for col in columns]} for i, r in enumerate(evals)]
    return {"headers": [LABELS[k] for k in keys], "rows": rows}


def training_section(log: TrainingLog | None) -> dict | None:
    if log is None or len(log.missing) == 3:  # a report of one predictions file, or a RUN of evaluations only
        return None
    best_step = log.state.get("best_step")
    curves = []
    if log.train or log.evals:
        curves.append(report_plots.loss_curve(log.train, log.evals, best_step))
    if any("lr" in r for r in log.train):
        curves.append(report_plots.lr_curve(log.train))
    if any(key in r for r in log.evals for key, _ in EVAL_CURVES):
        curves.append(
            report_plots.eval_curves(log.evals, EVAL_CURVES, report_plots.last_step(log.train, log.evals))
        )
    return {
        "facts": run_facts(log),
        "curves": [report_plots.to_data_uri(fig) for fig in curves],
        "evals": eval_table(log.evals) if log.evals else None,
        "config_text": log.config_text,
        "missing": log.missing,
    }


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


def gallery(records: list[dict], best: bool, dataset: DatasetSummary) -> list[dict]:
    """The GALLERY_SIZE best or worst items as template-ready cards."""
    ranked = sorted(range(len(records)), key=lambda i: (item_loss(records[i]), i), reverse=not best)
    cards = []
    for i in ranked[:GALLERY_SIZE]:
        r = records[i]
        item_id = str(r.get("id", i))
        currency = dataset.currencies.get(item_id) or r["truth"].get("currency") or dataset.currency
        currency = currency if isinstance(currency, str) else None
        cards.append(
            {
                "id": item_id,
                "image": thumbnail_uri(r.get("image"), THUMBNAIL_PX),
                "truth": r["truth"],
                "parsed": r["parsed"],
                "answer": r.get("answer") or "",
                "errors": r["errors"],
                "price": money(r["parsed"]["price"], currency),
                "true_price": money(r["truth"]["price"], currency),
            }
        )
    return cards


# ---------------------------------------------------------------------------------------------- render


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("phivision.evaluate", "templates"),
        autoescape=jinja2.select_autoescape(["html", "jinja"], default=True),
        undefined=jinja2.StrictUndefined,
    )


def render_report(
    stages: list[Stage],
    title: str = "phivision evaluation report",
    log: TrainingLog | None = None,
    data_dir: str | None = None,
    notes: list[str] | None = None,
    resamples: int = bootstrap.RESAMPLES,
    seed: int = bootstrap.SEED,
) -> str:
    """The report's HTML: headline over all stages, the run and dataset, curves, plots, breakdowns, galleries."""
    if not stages:
        raise ValueError("no evaluation to report")
    notes = notes if notes is not None else []
    final = stages[-1]
    dataset = summarize_dataset(data_dir, final, notes)
    headline = headline_table(stages, resamples, seed, notes, dataset.currency)
    training = training_section(log)
    dataset_rows = [
        {
            **row,
            "price_min": money(row["price_min"], dataset.currency),
            "price_median": money(row["price_median"], dataset.currency),
            "price_max": money(row["price_max"], dataset.currency),
        }
        for row in dataset.rows
    ]
    return (
        _environment()
        .get_template("report.html.jinja")
        .render(
            title=title,
            generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            notes=notes,
            stages=stage_table(stages),
            final=final.name,
            headline=headline,
            resamples=resamples,
            seed=seed,
            dataset={"source": dataset.source, "currency": dataset.currency, "rows": dataset_rows},
            training=training,
            scatter=report_plots.to_data_uri(report_plots.price_scatter(final.records, dataset.currency)),
            histogram=report_plots.to_data_uri(report_plots.error_histogram(final.records)),
            bands=price_band_table(stages, dataset.currency),
            confusion=report_plots.to_data_uri(report_plots.confusion_matrix(final.records)),
            categories=category_breakdown_table(stages),
            best=gallery(final.records, True, dataset),
            worst=gallery(final.records, False, dataset),
            scoring=final.metrics.get("scoring") if isinstance(final.metrics.get("scoring"), dict) else {},
        )
    )


def _data_dir(stages: list[Stage], log: TrainingLog | None) -> str | None:
    """Where the evaluated catalog lives: the last stage's metrics.json, else the run's config."""
    for value in (stages[-1].metrics.get("data"), _lookup((log.config if log else None) or {}, "data.path")):
        if isinstance(value, str) and value:
            return value
    return None


def write_report(args: ReportArgs) -> Path:
    """Render the report for a RUN (all its eval stages and its training log) or one predictions file, and write
    it atomically. What could not be read from the training log is printed as a warning and shown in the report.

    ``args`` (:class:`ReportArgs`, validated): ``run`` a training RUN directory with
    ``eval/<stage>/predictions.jsonl``, or ``predictions`` one predictions.jsonl (or the directory holding it);
    ``out`` the HTML file (default ``RUN/report.html``, or ``report.html`` beside the predictions); ``resamples``
    bootstrap resamples for the 95% intervals (0: none), drawn with ``seed`` (same inputs, same intervals).
    """
    run, predictions, out, resamples, seed = args.run, args.predictions, args.out, args.resamples, args.seed
    notes: list[str] = []
    log = None
    if run is not None:
        stages = load_run(run, notes)
        log = read_training_log(Path(run), notes)
        out = Path(out) if out is not None else RunLayout(run).report
        title = f"phivision report: {Path(run).resolve().name}"
    else:
        stage = load_stage(predictions, notes=notes)
        stages = [stage]
        where = Path(predictions)
        where = where if where.is_dir() else where.parent
        out = Path(out) if out is not None else where / RunLayout.REPORT
        title = f"phivision report: {where.resolve().name}"
    if out.is_dir():
        raise PhivisionError(f"--out {out}: is a directory (give the HTML file to write)")
    html = render_report(stages, title, log, _data_dir(stages, log), notes, resamples, seed)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    try:
        return atomic_write_text(out, html)
    except OSError as err:
        raise PhivisionError(f"--out {out}: cannot write ({err.strerror})") from None
