"""What the report reads, checked: evaluation outputs strictly, the training run's logs leniently.

``predictions.jsonl`` and ``metrics.json`` are the report's subject: a missing key, a wrong type or a broken line
is a user error naming the file, the line and the key (exit 2). The training run's ``metrics.jsonl``,
``trainer_state.json`` and ``config.yaml`` only add context (curves, config), and a run killed mid-write leaves
a torn last line in ``metrics.jsonl``: so what cannot be read there is skipped, and every skip becomes a note
printed as a warning and shown at the top of the report. The evaluation is never hidden by a damaged log.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from phivision.data.layout import CATALOG_FILE, SPLITS, RunLayout, load_catalog
from phivision.errors import PhivisionError
from phivision.evaluate.metrics import HEADLINE, summarize, symmetric_ape

STAGE_ORDER = ("before", "after")


@dataclass
class Stage:
    """One evaluation: its name, metrics (recomputed from the records, plus metrics.json's context) and records."""

    name: str
    metrics: dict
    records: list[dict]


@dataclass
class TrainingLog:
    """The training run around the evaluations, as far as it could be read."""

    missing: list[str] = field(default_factory=list)  # names of the files the run does not have
    train: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", ...}
    evals: list[dict] = field(default_factory=list)  # {"step", "val_loss", "price_mape", ...}
    state: dict = field(default_factory=dict)  # trainer_state.json's fields that had the right type
    config: dict | None = None
    config_text: str | None = None


# ------------------------------------------------------------------------------------- value checks


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _non_negative_number(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _text_or_null(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _positive_or_null(value: Any) -> bool:
    return value is None or _positive_number(value)


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


# key -> (check, what it must be); nested records are checked one level at a time
RECORD_KEYS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "truth": {
        "title": (_text, "text"),
        "category": (_text, "text"),
        "price": (_positive_number, "a positive number"),
    },
    "parsed": {
        "title": (_text_or_null, "text or null"),
        "category": (_text_or_null, "text or null"),
        "price": (_positive_or_null, "a positive number or null"),
    },
    "errors": {
        "price_abs_error": (_non_negative_number, "a number >= 0"),
        "price_ape": (_non_negative_number, "a number >= 0"),
        "price_log_error": (_non_negative_number, "a number >= 0"),
        "price_within_10pct": (_boolean, "true or false"),
        "category_correct": (_boolean, "true or false"),
        "title_exact": (_boolean, "true or false"),
        "title_similarity": (_non_negative_number, "a number >= 0"),
        "complete": (_boolean, "true or false"),
    },
}
OPTIONAL_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "text"),
    "image": (_text_or_null, "text or null"),
    "answer": (_text_or_null, "text or null"),
    "image_error": (_text_or_null, "text or null"),
}


def check_record(record: Any, where: str) -> dict:
    """A predictions.jsonl record with every key the report needs, of the right type; raises naming the key."""
    if not isinstance(record, dict):
        raise PhivisionError(f"{where}: expected a JSON object, got {_describe(record)}")
    for section, keys in RECORD_KEYS.items():
        if section not in record:
            raise PhivisionError(f"{where}: missing key '{section}'")
        part = record[section]
        if not isinstance(part, dict):
            raise PhivisionError(f"{where}: key '{section}': expected an object, got {_describe(part)}")
        for key, (valid, expected) in keys.items():
            if key not in part:
                raise PhivisionError(f"{where}: missing key '{section}.{key}'")
            if not valid(part[key]):
                raise PhivisionError(
                    f"{where}: key '{section}.{key}': expected {expected}, got {_describe(part[key])}"
                )
    for key, (valid, expected) in OPTIONAL_KEYS.items():
        if key in record and not valid(record[key]):
            raise PhivisionError(f"{where}: key '{key}': expected {expected}, got {_describe(record[key])}")
    errors = record["errors"]
    levels = errors.get("levels", {})
    if not isinstance(levels, dict) or not all(v is None or isinstance(v, bool) for v in levels.values()):
        raise PhivisionError(f"{where}: key 'errors.levels': expected an object of true, false or null")
    if "price_sape" in errors and not _non_negative_number(errors["price_sape"]):
        raise PhivisionError(
            f"{where}: key 'errors.price_sape': expected a number >= 0, got {_describe(errors['price_sape'])}"
        )
    # files written before SMAPE existed: the score follows from the two prices alone
    errors.setdefault("price_sape", symmetric_ape(record["truth"]["price"], record["parsed"]["price"]))
    return record


def read_predictions(path: Path) -> list[dict]:
    """Read predictions.jsonl strictly: a broken line, a missing key or a wrong type names the file and line."""
    records = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path} line {number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise PhivisionError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PhivisionError(f"{where}: not JSON ({err.msg})") from None
                records.append(check_record(record, where))
    except OSError as err:
        raise PhivisionError(f"{path}: cannot read ({err.strerror})") from None
    if not records:
        raise PhivisionError(f"{path}: no predictions")
    return records


def read_saved_metrics(path: Path) -> dict:
    """metrics.json beside the predictions: an object whose headline values (and baseline's) are numbers."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PhivisionError(f"{path} line {err.lineno}: not JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise PhivisionError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise PhivisionError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(saved, dict):
        raise PhivisionError(f"{path}: expected a JSON object, got {_describe(saved)}")
    baseline = saved.get("baseline")
    if baseline is not None and not isinstance(baseline, dict):
        raise PhivisionError(f"{path}: key 'baseline': expected an object, got {_describe(baseline)}")
    for prefix, metrics in (("", saved), ("baseline.", baseline or {})):
        for key, _, _ in HEADLINE:
            if key in metrics and metrics[key] is not None and not _is_number(metrics[key]):
                raise PhivisionError(
                    f"{path}: key '{prefix}{key}': expected a number, got {_describe(metrics[key])}"
                )
    for key in ("model", "data", "split"):
        if key in saved and not isinstance(saved[key], str):
            raise PhivisionError(f"{path}: key '{key}': expected text, got {_describe(saved[key])}")
    return saved


# ------------------------------------------------------------------------------------------ stages


def load_stage(
    predictions: str | os.PathLike, name: str | None = None, notes: list[str] | None = None
) -> Stage:
    """A predictions file and the metrics.json beside it (which adds the baseline, model and data).

    The metrics are recomputed from the records, the one source the intervals and breakdowns also use; a
    metrics.json value that disagrees is reported in ``notes``.
    """
    path = Path(predictions)
    if path.is_dir():
        path = path / RunLayout.EVAL_PREDICTIONS
    if not path.is_file():
        raise PhivisionError(f"{path}: not found")
    records = read_predictions(path)
    metrics = summarize(records)
    metrics_path = path.parent / RunLayout.EVAL_METRICS
    if metrics_path.is_file():
        saved = read_saved_metrics(metrics_path)
        for key, _, _ in HEADLINE:
            old, new = saved.get(key), metrics.get(key)
            if notes is None or not _is_number(old) or new is None:
                continue
            if not math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-9):
                notes.append(
                    f"{metrics_path}: {key} is {old:.6g} but {new:.6g} when recomputed from "
                    f"{path.name}; the report shows the recomputed value"
                )
        metrics = {**saved, **metrics}
    return Stage(name or path.parent.name, metrics, records)


def load_run(run: str | os.PathLike, notes: list[str] | None = None) -> list[Stage]:
    """Every ``RUN/eval/<stage>/predictions.jsonl``: before, after, then any others by name."""
    run = Path(run)
    if not run.is_dir():
        raise PhivisionError(f"--run {run}: not a directory")
    root = RunLayout(run).evals
    found = (
        sorted(p.parent.name for p in root.glob(f"*/{RunLayout.EVAL_PREDICTIONS}")) if root.is_dir() else []
    )
    if not found:
        raise PhivisionError(
            f"{root}: no evaluation found (write one with `phivision evaluate --model {run} --data DIR "
            f"--out {root}/after/{RunLayout.EVAL_METRICS}`)"
        )
    ordered = [s for s in STAGE_ORDER if s in found] + [s for s in found if s not in STAGE_ORDER]
    return [load_stage(root / s / RunLayout.EVAL_PREDICTIONS, s, notes) for s in ordered]


# --------------------------------------------------------------------------------------- training run


def read_training_log(run: Path, notes: list[str]) -> TrainingLog:
    """RUN/metrics.jsonl, RUN/trainer_state.json and RUN/config.yaml. A missing file is listed in ``missing``
    (a RUN may hold evaluations only); a damaged one becomes a note, and what could be read is kept."""
    log = TrainingLog()
    layout = RunLayout(run)
    _read_metrics_lines(layout.metrics_log, log, notes)
    _read_trainer_state(layout.trainer_state, log, notes)
    _read_config(layout.config, log, notes)
    return log


def _read_metrics_lines(path: Path, log: TrainingLog, notes: list[str]) -> None:
    if not path.is_file():
        log.missing.append(path.name)
        return
    skipped: list[str] = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        notes.append(f"{path}: cannot read ({err.strerror}), so no training curves")
        return
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            skipped.append(f"line {number}: not JSON")
            continue
        if not isinstance(record, dict) or record.get("type") not in ("train", "eval"):
            skipped.append(f"line {number}: not a train or eval record")
            continue
        step = record.get("step")
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            skipped.append(f"line {number}: key 'step': expected a whole number >= 0, got {_describe(step)}")
            continue
        values = {k: float(v) for k, v in record.items() if k not in ("type", "step") and _is_number(v)}
        wrong = [
            k for k, v in record.items() if k not in ("type", "step") and v is not None and not _is_number(v)
        ]
        if wrong:
            skipped.append(
                f"line {number}: key '{wrong[0]}': expected a number, got {_describe(record[wrong[0]])}"
            )
        (log.train if record["type"] == "train" else log.evals).append({"step": step, **values})
    if skipped:
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        notes.append(f"{path}: skipped what could not be read: {'; '.join(skipped[:3])}{more}")
    log.train.sort(key=lambda r: r["step"])
    log.evals.sort(key=lambda r: r["step"])


STATE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "step": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "total_steps": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "metric": lambda v: isinstance(v, str),
    "best_metric": _is_number,
    "best_step": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "done": _boolean,
    "stopped_early": _boolean,
}


def _read_trainer_state(path: Path, log: TrainingLog, notes: list[str]) -> None:
    if not path.is_file():
        log.missing.append(path.name)
        return
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        notes.append(f"{path}: cannot read ({getattr(err, 'msg', None) or err.__class__.__name__}), left out")
        return
    if not isinstance(state, dict):
        notes.append(f"{path}: expected a JSON object, left out")
        return
    wrong = [k for k, valid in STATE_FIELDS.items() if state.get(k) is not None and not valid(state[k])]
    if wrong:
        notes.append(f"{path}: key '{wrong[0]}' has the wrong type ({_describe(state[wrong[0]])}), left out")
    log.state = {
        k: state[k] for k, valid in STATE_FIELDS.items() if state.get(k) is not None and valid(state[k])
    }


def _read_config(path: Path, log: TrainingLog, notes: list[str]) -> None:
    if not path.is_file():
        log.missing.append(path.name)
        return
    try:
        text = path.read_text(encoding="utf-8")
        config = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        notes.append(f"{path}: cannot read ({err.__class__.__name__}), left out")
        return
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        notes.append(f"{path}{line}: not YAML, shown as text only")
        log.config_text = text
        return
    log.config_text = text
    if isinstance(config, dict):
        log.config = config
    else:
        notes.append(f"{path}: expected a mapping of keys, shown as text only")


# -------------------------------------------------------------------------------------------- dataset


@dataclass
class DatasetSummary:
    """Splits, categories and price range of the catalog the evaluations came from."""

    source: str  # the catalog's path, or the predictions file when the catalog could not be read
    rows: list[dict]  # {"split", "items", "categories", "price_min", "price_median", "price_max"}
    currency: str | None  # one ISO code, "EUR, USD" when mixed, None when unknown
    currencies: dict[str, str] = field(default_factory=dict)  # product id -> currency, when known


def _summary_row(split: str, categories: list[str], prices: np.ndarray) -> dict:
    return {
        "split": split,
        "items": len(prices),
        "categories": len(set(categories)),
        "price_min": float(prices.min()),
        "price_median": float(np.median(prices)),
        "price_max": float(prices.max()),
    }


def summarize_dataset(data_dir: str | None, final: Stage, notes: list[str]) -> DatasetSummary:
    """The catalog behind ``data_dir`` split by split; the evaluated items alone when it cannot be read."""
    if data_dir:
        try:
            catalog = load_catalog(data_dir, check_images=False)
        except PhivisionError as err:
            notes.append(f"dataset summary: {err}; summarizing the evaluated items only")
        else:
            rows = [
                _summary_row(split, list(part["category"]), part["full_price"].to_numpy())
                for split in SPLITS
                if len(part := catalog[catalog["split"] == split])
            ]
            rows.append(_summary_row("all", list(catalog["category"]), catalog["full_price"].to_numpy()))
            codes = sorted(set(catalog["currency"]))
            return DatasetSummary(
                source=str(Path(data_dir) / CATALOG_FILE),
                rows=rows,
                currency=", ".join(codes) if codes else None,
                currencies=dict(zip(catalog["product_code"], catalog["currency"], strict=True)),
            )
    prices = np.array([r["truth"]["price"] for r in final.records])
    codes = sorted(
        {r["truth"]["currency"] for r in final.records if isinstance(r["truth"].get("currency"), str)}
    )
    split = final.metrics.get("split") or "evaluated"
    return DatasetSummary(
        source=f"the items of {final.name} (the catalog itself could not be read)"
        if data_dir
        else f"the items of {final.name} (no catalog path in metrics.json or config.yaml)",
        rows=[_summary_row(split, [r["truth"]["category"] for r in final.records], prices)],
        currency=", ".join(codes) if codes else None,
    )
