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

from phivision.answer.constrain import AnswerConstraint, constraint_name
from phivision.answer.generate import answer_image_files
from phivision.answer.prompt import parse_answer
from phivision.args import EvaluateArgs
from phivision.data.layout import RunLayout, load_catalog
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
from phivision.io import atomic_write_json, atomic_write_text
from phivision.runs import load_model

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
) -> tuple[list[str], list[str | None]]:
    """Raw answers for every item (a product's photo paths), loading images chunk by chunk; an item without a
    readable photo answers ""."""
    answers: list[str] = []
    problems: list[str | None] = []
    with tqdm(total=len(paths), desc="evaluate", unit="img", disable=not progress) as bar:
        for _, answer, problem in answer_image_files(
            loaded, paths, IMAGES_PER_CHUNK, batch_size, max_new_tokens, progress=bar, constraint=constraint
        ):
            answers.append(answer)
            problems.append(problem)
    return answers, problems


def evaluate(args: EvaluateArgs) -> dict:
    """Score a model's answers on one split of a dataset directory.

    ``args`` (:class:`EvaluateArgs`, validated): ``model`` a RUN or checkpoint directory (or hub id) for
    :func:`phivision.runs.load_model` (with ``args.loading``), or a ``LoadedModel``; ``data`` a dataset directory
    whose train split gives the baselines; ``split``; ``out`` a metrics.json path or a directory (e.g.
    ``RUN/eval/after``), None writes nothing; ``limit`` scores only the first items; ``max_images`` the photos of
    a product in its prompt (None: as many as the model was trained with, ``LoadedModel.max_images``);
    ``generation`` the batch size, answer length and whether answers are constrained to the model's template and
    training categories (:mod:`phivision.answer.constrain`).

    Returns:
        The metrics dict written to metrics.json (flat headline keys, ``per_category``, ``baseline``, ...).
    """
    data_dir, split, limit, generation = args.data, args.split, args.limit, args.generation
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

    model = args.model
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, device=args.loading.device, dtype=args.loading.dtype)
    else:
        loaded = model
    max_images = args.max_images or loaded.max_images
    paths = [[(data_dir / p).resolve() for p in photos[:max_images]] for photos in items["image_paths"]]
    constraint = AnswerConstraint.for_model(loaded) if generation.constrain else None
    answers, problems = _answer_all(
        loaded, paths, generation.batch_size, generation.max_new_tokens, args.progress, constraint
    )

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
            "max_new_tokens": generation.max_new_tokens,
            "max_images": max_images,
            "constraint": constraint_name(constraint),
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
