"""Evaluate a model on one split of a catalog: generate, parse, score, write metrics.json + predictions.jsonl.

Inside a training RUN, evaluations live in ``RUN/eval/<stage>/`` (``before`` for the base model, ``after`` for
the fine-tuned one), each holding ``metrics.json`` and ``predictions.jsonl``; ``phivision report --run RUN``
reads every stage found there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from phivision.data.layout import SPLITS, load_catalog
from phivision.errors import PhivisionError
from phivision.evaluate.constrain import AnswerConstraint, constraint_name
from phivision.evaluate.metrics import (
    HEADLINE,
    SCORING,
    TrainStats,
    baseline_metrics,
    format_value,
    score,
    summarize,
)
from phivision.io import atomic_write_json, atomic_write_text
from phivision.prompt import parse_answer

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
# Images loaded and answered at a time: bounds memory on large splits (images are decoded at full size).
IMAGES_PER_CHUNK = 256


def eval_dir(run: str | os.PathLike, stage: str) -> Path:
    """Where a RUN keeps one evaluation: ``RUN/eval/<stage>/`` (stages: ``before``, ``after``)."""
    return Path(run) / EVAL_DIR / stage


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``out`` is metrics.json's path (anything ending in .json) or a directory; predictions.jsonl goes beside it."""
    out = Path(out)
    metrics_path = out if out.suffix == ".json" else out / METRICS_FILE
    return metrics_path, metrics_path.parent / PREDICTIONS_FILE


def _answer_all(
    loaded: Any,
    paths: list[list[Path]],
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    constraint: AnswerConstraint | None = None,
) -> tuple[list[str], list[str | None]]:
    """Raw answers for every item (a product's photo paths), loading images chunk by chunk; an item without a
    readable photo answers ""."""
    from phivision.evaluate.generate import answer_image_files

    answers: list[str] = []
    problems: list[str | None] = []
    with tqdm(total=len(paths), desc="evaluate", unit="img", disable=not progress) as bar:
        for _, answer, problem in answer_image_files(
            loaded, paths, IMAGES_PER_CHUNK, batch_size, max_new_tokens, progress=bar, constraint=constraint
        ):
            answers.append(answer)
            problems.append(problem)
    return answers, problems


def evaluate(
    model: str | os.PathLike | Any,
    data_dir: str | os.PathLike,
    split: str = "test",
    out: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    limit: int | None = None,
    progress: bool = True,
    constrain: bool = True,
    max_images: int | None = None,
) -> dict:
    """Score a model's answers on one split of a dataset directory.

    Args:
        model: a RUN or checkpoint directory (or hub id) for ``phivision.runs.load_model``, or a ``LoadedModel``.
        data_dir: dataset directory in the phivision layout; its train split gives the baselines.
        split: train, val or test.
        out: metrics.json path or a directory (e.g. ``RUN/eval/after``); None writes nothing.
        batch_size: images per generation batch.
        max_new_tokens: answer length cap.
        limit: score only the first ``limit`` items of the split (quick checks).
        progress: show a progress bar.
        constrain: force answers into the model's template, with the category one of its training categories
            when the model records them (:mod:`phivision.evaluate.constrain`); False: free generation.
        max_images: how many of a product's photos go into its prompt, in order; None: as many as the model was
            trained with (``LoadedModel.max_images``: the run's ``data.max_images``, 1 when not recorded).

    Returns:
        The metrics dict written to metrics.json (flat headline keys, ``per_category``, ``baseline``, ...).
    """
    if split not in SPLITS:
        raise PhivisionError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise PhivisionError(f"--batch-size {batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise PhivisionError(f"--limit {limit}: must be at least 1")
    if max_images is not None and max_images < 1:
        raise PhivisionError(f"--max-images {max_images}: must be at least 1")
    data_dir = Path(data_dir)
    catalog = load_catalog(data_dir)
    items = catalog[catalog["split"] == split].reset_index(drop=True)
    if limit is not None:
        items = items.iloc[:limit]
    if items.empty:
        raise PhivisionError(f"{data_dir / 'catalog.parquet'}: no rows in split {split!r}")
    train = catalog[catalog["split"] == "train"]
    if train.empty:
        raise PhivisionError(
            f"{data_dir / 'catalog.parquet'}: no train rows (the baselines come from the train split)"
        )
    stats = TrainStats.from_catalog(train)

    if isinstance(model, (str, os.PathLike)):
        from phivision.runs import load_model

        loaded = load_model(model)
    else:
        loaded = model
    max_images = max_images or getattr(loaded, "max_images", 1)
    paths = [[(data_dir / p).resolve() for p in photos[:max_images]] for photos in items["image_paths"]]
    constraint = AnswerConstraint.for_model(loaded) if constrain else None
    answers, problems = _answer_all(loaded, paths, batch_size, max_new_tokens, progress, constraint)

    scored = score(items, [parse_answer(a, loaded.prompt) for a in answers], stats)
    records = []
    for record, product, path, answer, problem in zip(
        scored, items["product_code"], paths, answers, problems, strict=True
    ):
        image = {"image": str(path[0]), "images": [str(p) for p in path]}
        records.append({"id": str(product), **image, "answer": answer, **record})
        if problem is not None:
            records[-1]["image_error"] = problem
    baseline = baseline_metrics(items, stats)
    metrics = summarize(records, baseline=baseline)
    metrics.update(
        {
            "image_errors": sum(p is not None for p in problems),
            "model": str(getattr(loaded, "source", model)),
            "data": str(data_dir),
            "split": split,
            "max_new_tokens": max_new_tokens,
            "max_images": max_images,
            "constraint": constraint_name(constraint),
            "baseline": baseline,
            "scoring": SCORING,
        }
    )
    if out is not None:
        metrics_path, predictions_path = output_paths(out)
        atomic_write_text(
            predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
        atomic_write_json(metrics_path, metrics)  # written last: its presence means the evaluation finished
    return metrics


def summary_table(metrics: dict) -> str:
    """The headline metrics as aligned text, with the baseline beside them when present."""
    baseline = metrics.get("baseline") or {}
    lines = [f"{'metric':<28}{'value':>12}{'baseline':>12}"]
    for key, label, kind in HEADLINE:
        if key not in metrics:
            continue
        lines.append(
            f"{label:<28}{format_value(metrics[key], kind):>12}{format_value(baseline.get(key), kind):>12}"
        )
    return "\n".join(lines)
