"""Evaluate a model on one split of a catalog: generate, parse, score, write metrics.json + predictions.jsonl.

Inside a training RUN, evaluations live in ``RUN/eval/<stage>/`` (``before`` for the base model, ``after`` for
the fine-tuned one), each holding ``metrics.json`` and ``predictions.jsonl``; ``phivision report --run RUN``
reads every stage found there.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from phivision.answer.calibration import PLOT_LEVELS, PriceCalibration
from phivision.answer.constrain import AnswerConstraint, constraint_name, short_budget_note
from phivision.answer.generate import answer_image_files
from phivision.answer.prompt import parse_answer
from phivision.answer.ranges import answer_range, calibrate_model
from phivision.answer.taxonomy import model_taxonomy, read_categories_file, with_taxonomy
from phivision.args import SPLITS, EvaluateArgs
from phivision.data.layout import RunLayout, dataset_files, load_catalog
from phivision.errors import PhivisionError
from phivision.evaluate.metrics import (
    HEADLINE,
    SCORING,
    TrainStats,
    baseline_metrics,
    format_value,
    score,
    summarize,
)
from phivision.io import atomic_write_json, atomic_write_text, refuse_overwriting_inputs
from phivision.runs import load_model, model_files

# Images loaded and answered at a time: bounds memory on large splits (images are decoded at full size).
IMAGES_PER_CHUNK = 256


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``out`` is metrics.json's path (anything ending in .json) or a directory; predictions.jsonl goes beside it."""
    out = Path(out)
    metrics_path = out if out.suffix == ".json" else out / RunLayout.EVAL_METRICS
    return metrics_path, metrics_path.parent / RunLayout.EVAL_PREDICTIONS


def _answer_all(
    loaded: Any,
    paths: list[list[Path]],
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    constraint: AnswerConstraint | None = None,
    price_spread: bool = False,
) -> tuple[list[Any], list[str | None]]:
    """A Completion for every item (a product's photo paths; None for an item without a readable photo),
    loading images chunk by chunk."""
    completions: list[Any] = []
    problems: list[str | None] = []
    with tqdm(total=len(paths), desc="evaluate", unit="img", disable=not progress) as bar:
        for _, completion, problem in answer_image_files(
            loaded, paths, IMAGES_PER_CHUNK, batch_size, max_new_tokens, bar, constraint, price_spread
        ):
            completions.append(completion)
            problems.append(problem)
    return completions, problems


def _calibration(
    loaded: Any, data_dir: Path, split: str, constraint: AnswerConstraint | None, **answering: Any
) -> tuple[PriceCalibration | None, str]:
    """The calibration of the model's price ranges, and where it came from: the model's own (stored at the end
    of training), else one made now on the val split of ``data_dir`` (not when that is the split evaluated:
    its coverage would be measured on the items it was fitted to)."""
    if constraint is None:
        return None, "no price ranges: answers are not constrained (--no-constrain)"
    if loaded.calibration is not None:
        return loaded.calibration, "the model's calibration"
    if split == "val":
        return None, "no price ranges: the model has no calibration, and the val split is the one evaluated"
    catalog_has_val = (load_catalog(data_dir)["split"] == "val").any()
    if not catalog_has_val:
        return None, f"no price ranges: the model has no calibration and {data_dir} has no val split"
    return calibrate_model(
        loaded, data_dir, "val", constraint, **answering
    ), "calibrated now on the val split"


def evaluate(args: EvaluateArgs) -> dict:
    """Score a model's answers on one split of a dataset directory.

    ``args`` (:class:`EvaluateArgs`, validated): ``model`` a RUN or checkpoint directory (or hub id) for
    :func:`phivision.runs.load_model` (with ``args.loading``), or a ``LoadedModel``; ``data`` a dataset directory
    whose train split gives the baselines; ``split``; ``out`` a metrics.json path or a directory (e.g.
    ``RUN/eval/after``), None writes nothing; ``limit`` scores only the first items; ``max_images`` the photos of
    a product in its prompt (None: as many as the model was trained with, ``LoadedModel.max_images``);
    ``generation`` the batch size, answer length and whether answers are constrained to the model's template and
    taxonomy (:mod:`phivision.answer.constrain`); ``answering`` the file of categories for a model that records
    none (the taxonomy is the model's labels, else that file, else the train split of ``data``:
    :mod:`phivision.answer.taxonomy`) and the level of the price ranges; ``question`` asked instead of the
    model's own, ``{categories}`` in it the taxonomy.

    Returns:
        The metrics dict written to metrics.json (flat headline keys, ``per_category``, ``baseline``, ...).
    """
    data_dir, split, limit, generation = args.data, args.split, args.limit, args.generation
    price_level = args.answering.price_level
    catalog = load_catalog(data_dir)
    items = catalog[catalog["split"] == split].reset_index(drop=True)
    if limit is not None:
        items = items.iloc[:limit]
    if items.empty:
        counts = ", ".join(f"{int((catalog['split'] == s).sum())} {s}" for s in SPLITS)
        raise PhivisionError(
            f"{data_dir / 'catalog.parquet'}: no rows in split {split!r} ({counts}); score another --split, "
            "or sample or prepare more products"
        )
    train = catalog[catalog["split"] == "train"]
    if train.empty:
        raise PhivisionError(
            f"{data_dir / 'catalog.parquet'}: no train rows (the baselines come from the train split)"
        )
    stats = TrainStats.from_catalog(train)
    if args.answering.categories is not None:
        read_categories_file(args.answering.categories)  # a broken file stops before the model loads

    model = args.model
    if args.out is not None:  # before the model loads: a mistake costs nothing
        metrics_path, predictions_path = output_paths(args.out)
        refuse_overwriting_inputs(
            {"--out": metrics_path, "the predictions beside --out": predictions_path},
            dataset_files(data_dir, catalog) + model_files(model),
        )
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, device=args.loading.device, dtype=args.loading.dtype)
        for note in loaded.notes:
            print(f"warning: {note}", file=sys.stderr)
    else:
        loaded = model
    taxonomy = model_taxonomy(loaded, args.answering.categories, data_dir)
    loaded = with_taxonomy(loaded, taxonomy, args.question)
    max_images = args.max_images or loaded.max_images
    paths = [[(data_dir / p).resolve() for p in photos[:max_images]] for photos in items["image_paths"]]
    constraint = AnswerConstraint.for_model(loaded) if generation.constrain else None
    vocab_size = loaded.model.config.vocab_size
    note = short_budget_note(loaded.processor, vocab_size, constraint, generation.max_new_tokens)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    answering = {
        "batch_size": generation.batch_size,
        "max_new_tokens": generation.max_new_tokens,
        "progress": args.progress,
    }
    calibration, calibrated = _calibration(loaded, data_dir, split, constraint, limit=limit, **answering)
    completions, problems = _answer_all(
        loaded,
        paths,
        generation.batch_size,
        generation.max_new_tokens,
        args.progress,
        constraint,
        calibration is not None,
    )
    answers = ["" if c is None else c.text for c in completions]
    ranges = None
    if calibration is not None:
        ranges = [answer_range(c, loaded.prompt, calibration, price_level, plot=True) for c in completions]

    parsed = [parse_answer(a, loaded.prompt) for a in answers]
    scored = score(items, parsed, stats, ranges)
    records = []
    for record, product, path, answer, problem in zip(
        scored, items["product_code"], paths, answers, problems, strict=True
    ):
        image = {"image": str(path[0]), "images": [str(p) for p in path]}
        records.append({"id": str(product), **image, "answer": answer, **record})
        if problem is not None:
            records[-1]["image_error"] = problem
    baseline = baseline_metrics(items, stats, price_level if ranges is not None else None)
    metrics = summarize(records, baseline=baseline)
    metrics.update(
        {
            "image_errors": sum(p is not None for p in problems),
            "model": str(getattr(loaded, "source", model)),
            "data": str(data_dir),
            "split": split,
            "max_new_tokens": generation.max_new_tokens,
            "max_images": max_images,
            "constraint": constraint_name(constraint),
            "question": loaded.prompt.question,
            "taxonomy": taxonomy.to_dict(),
            "price_interval": range_summary(calibration, calibrated, price_level),
            "baseline": baseline,
            "scoring": SCORING,
        }
    )
    if args.out is not None:
        metrics_path, predictions_path = output_paths(args.out)
        atomic_write_text(
            predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
        atomic_write_json(metrics_path, metrics)  # written last: its presence means the evaluation finished
    return metrics


def range_summary(calibration: PriceCalibration | None, how: str, level: float) -> dict:
    """What metrics.json records under ``price_interval``: the level, the calibration and where it came from,
    and the calibration's quantile at every level of the calibration plot."""
    if calibration is None:
        return {"level": None, "note": how}
    return {
        "level": level,
        "method": calibration.method,
        "calibration": {"source": calibration.source, "n": calibration.n, "how": how},
        "quantiles": {f"{100 * lv:g}": _finite(calibration.quantile(lv)) for lv in PLOT_LEVELS},
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summary_table(metrics: dict) -> str:
    """The headline metrics as aligned text, with the baseline beside them when present; then where the
    categories came from and how the price ranges were calibrated."""
    baseline = metrics.get("baseline") or {}
    lines = [f"{'metric':<28}{'value':>12}{'baseline':>12}"]
    for key, label, kind in HEADLINE:
        if key not in metrics:
            continue
        lines.append(
            f"{label:<28}{format_value(metrics[key], kind):>12}{format_value(baseline.get(key), kind):>12}"
        )
    if "taxonomy" in metrics:
        lines.append(f"categories: {taxonomy_text(metrics['taxonomy'])}")
    if "price_interval" in metrics:
        lines.append(f"price ranges: {range_text(metrics['price_interval'])}")
    return "\n".join(lines)


def taxonomy_text(taxonomy: Any) -> str:
    """Where a stage's category list came from, and its size (metrics.json ``taxonomy``)."""
    if not isinstance(taxonomy, dict) or taxonomy.get("source") not in ("run", "file", "data", "none"):
        return "—"
    if taxonomy["source"] == "none":
        return "none (free text)"
    origin = {"run": "the model's labels", "file": "file", "data": "train split of"}[taxonomy["source"]]
    text = f"{taxonomy.get('count')} from {origin} {taxonomy.get('path') or ''}".strip()
    return f"{text} ({taxonomy['note']})" if taxonomy.get("note") else text


def range_text(summary: Any) -> str:
    """A stage's price ranges: their level and calibration (metrics.json ``price_interval``)."""
    if not isinstance(summary, dict):
        return "—"
    if summary.get("level") is None:
        return str(summary.get("note") or "none")
    calibration = summary.get("calibration") if isinstance(summary.get("calibration"), dict) else {}
    return f"{100 * float(summary['level']):g}%, calibrated on the {calibration.get('source', '?')}"
