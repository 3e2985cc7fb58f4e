"""The Python API: one function per CLI verb, with the CLI's names and defaults.

``from phivision import sample, prepare, inspect, tiny, train, evaluate, report, load_model, predict, serve,
export, demo``. Each function checks its arguments (the same checks and messages as the CLI's flags, raising
:class:`~phivision.errors.PhivisionError`), then imports its implementation, so ``import phivision`` stays light
(no torch, transformers, pandas or FastAPI until a function is called).

The defaults are defined here, once: ``phivision.cli`` reads each flag's default from these signatures.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phivision.data import defaults
from phivision.errors import PhivisionError
from phivision.serve.limits import ServeLimits

if TYPE_CHECKING:
    from phivision.runs import LoadedModel
    from phivision.train.config import TrainConfig
    from phivision.train.loop import TrainResult

PathLike = str | os.PathLike

__all__ = [
    "demo",
    "evaluate",
    "export",
    "inspect",
    "load_model",
    "predict",
    "prepare",
    "report",
    "sample",
    "serve",
    "tiny",
    "train",
]


def check_range(name: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    """Raise PhivisionError naming the flag (``--max-new-tokens 0: must be at least 1``) when out of range."""
    if value is None:
        return
    flag = "--" + name.replace("_", "-")
    if low is not None and high is not None and not low <= value <= high:
        raise PhivisionError(f"{flag} {value}: must be between {low} and {high}")
    if low is not None and value < low:
        raise PhivisionError(f"{flag} {value}: must be at least {low}")
    if high is not None and value > high:
        raise PhivisionError(f"{flag} {value}: must be at most {high}")


def check_positive(name: str, value: float | None) -> None:
    """Raise PhivisionError naming the flag when ``value`` is not > 0 (None passes: "not set")."""
    if value is not None and not value > 0:
        raise PhivisionError(f"--{name.replace('_', '-')} {value}: must be greater than 0")


# ----------------------------------------------------------------------------------------------- data


def sample(
    out: PathLike,
    *,
    n: int | None = None,
    seed: int = defaults.SAMPLE_SEED,
    split: str | Sequence[float] | None = None,
    urls_out: PathLike | None = None,
    base_url: str = defaults.BASE_URL,
    like: PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw a synthetic catalog into ``out`` (the dataset layout) and return ``out``.

    The shape shows the category; colour, pattern, trim and size are visible and decide the price, so a small
    model can learn both. ``n``: products (default 600, or with ``like`` as many as that dataset); ``split``:
    train,val,test ratios (default 0.8,0.1,0.1, or ``like``'s); ``urls_out`` also writes a CSV of image URLs
    (DBQ schema, served at ``base_url``) to try :func:`prepare` against a local server. ``like``: copy that
    dataset's structure (categories, prices, title patterns, image sizes, splits), none of its content. An
    ``out`` holding another dataset is refused unless ``overwrite``.
    """
    from phivision.data.sample import sample as run_sample

    ratios = split if split is None or isinstance(split, str) else ",".join(str(r) for r in split)
    return run_sample(
        out,
        n=n,
        seed=seed,
        split=ratios,
        urls_out=urls_out,
        base_url=base_url,
        like=like,
        overwrite=overwrite,
    )


def prepare(
    source: str | Sequence[str],
    out: PathLike,
    *,
    title_col: str = defaults.TITLE_COL,
    category_col: str = defaults.CATEGORY_COL,
    price_col: str = defaults.PRICE_COL,
    image_col: str = defaults.IMAGE_COL,
    code_col: str = defaults.CODE_COL,
    currency_col: str = defaults.CURRENCY_COL,
    currency: str | None = None,
    decimal_comma: bool | None = None,
    max_price: float = defaults.MAX_PRICE,
    hub_split: str = defaults.HUB_SPLIT,
    hub_config: str | None = None,
    revision: str | None = None,
    split: str | Sequence[float] = defaults.SPLIT,
    seed: int = defaults.PREPARE_SEED,
    limit: int | None = None,
    concurrency: int = defaults.CONCURRENCY,
    per_host: int = defaults.PER_HOST,
    connect_timeout: float = defaults.CONNECT_TIMEOUT,
    read_timeout: float = defaults.READ_TIMEOUT,
    download_timeout: float = defaults.DOWNLOAD_TIMEOUT,
    retries: int = defaults.RETRIES,
    backoff: float = defaults.BACKOFF,
    max_wait: float = defaults.MAX_WAIT,
    max_bytes: int = defaults.MAX_BYTES,
    max_pixels: int = defaults.MAX_PIXELS,
    allow_local: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build a dataset in ``out`` from product tables with image URLs; return the report (also written to
    ``out/prepare_report.json``).

    ``source``: a hub dataset id, a local dataset directory, or a .csv/.tsv/.parquet/.jsonl file (or a list of
    them). The ``*_col`` arguments name the source columns; prices are read in any common locale
    (``decimal_comma`` fixes the decimal mark; default: each column's majority); downloads run ``concurrency``
    at a time (``per_host`` per host) with ``retries`` and a ``download_timeout`` each. A row that cannot be
    used is dropped with a reason in the report; the run goes on. Rerunning resumes; an ``out`` holding another
    dataset is refused unless ``overwrite``.
    """
    arguments = dict(locals())  # every parameter, by name: the library function takes the same keywords
    from phivision.data.prepare import prepare as run_prepare

    return run_prepare(**arguments)


def inspect(
    data: PathLike,
    *,
    out: PathLike | None = None,
    num_crops: str = defaults.NUM_CROPS,
    crop_size: int = defaults.CROP_SIZE,
    num_img_tokens: int = defaults.NUM_IMG_TOKENS,
    near_duplicate_bits: int = defaults.NEAR_DUPLICATE_BITS,
    progress: bool = True,
) -> dict:
    """Look at a dataset before training: write an offline HTML page (default ``DATA/inspect.html``) and a JSON
    beside it, and return the JSON's content (rows per split and category, prices, image sizes, image tokens
    per sample for each ``num_crops``, near-duplicates across splits, conflicts, outliers)."""
    from phivision.data.inspection import inspect as run_inspect

    return run_inspect(
        data,
        out=out,
        num_crops=num_crops,
        crop_size=crop_size,
        num_img_tokens=num_img_tokens,
        near_duplicate_bits=near_duplicate_bits,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------- model


def tiny(out: PathLike, *, seed: int = 0, num_crops: int = 4) -> Path:
    """Write a tiny, randomly initialised Phi-3-Vision checkpoint in the official layout to ``out`` (which must
    not exist or be empty) and return it; ``num_crops`` is the processor's most image tiles per image."""
    check_range("num_crops", num_crops, low=1)
    from phivision.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(out, seed=seed, num_crops=num_crops)


def load_model(
    model: PathLike,
    *,
    device: str | None = None,
    dtype: str | None = None,
    merge: bool = True,
) -> LoadedModel:
    """Load a training RUN directory, a checkpoint directory or a hub id for inference.

    Returns a ``LoadedModel`` (model, processor, the prompt format it was trained with, source). ``device``:
    default cuda when available; ``dtype``: default bf16 on cuda, fp32 on cpu; ``merge`` folds a LoRA adapter
    into the base weights.
    """
    from phivision.runs import load_model as run_load_model

    return run_load_model(model, device=device, dtype=dtype, merge=merge)


# ---------------------------------------------------------------------------------------------- train


def train(
    out: PathLike,
    *,
    data: PathLike | None = None,
    model: str | None = None,
    config: PathLike | TrainConfig | None = None,
    resume: bool = False,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune Phi-3-Vision (LoRA, QLoRA or full) and write the run to ``out``; return a ``TrainResult``.

    The config is the built-in defaults <- ``config`` (a YAML path, or a ``TrainConfig``; on ``resume`` without
    one, the run's own config.yaml) <- ``data``/``model``/``out`` <- ``overrides`` (``"optim.lr=1e-4"``...).
    """
    from phivision.train.config import TrainConfig, cli_config, load_config
    from phivision.train.loop import train as run_training

    if isinstance(config, TrainConfig):
        values: dict[str, Any] = {**config.to_dict(), "out": str(out)}
        if data is not None:
            values["data"] = {**values["data"], "path": str(data)}
        if model is not None:
            values["model"] = str(model)
        resolved = load_config(None, list(overrides or []), **values)
    else:
        resolved = cli_config(
            out, data=data, model=model, config=config, resume=resume, overrides=list(overrides or [])
        )
    return run_training(resolved, resume=resume, progress=progress)


# ------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: PathLike | LoadedModel,
    data: PathLike,
    out: PathLike | None = None,
    *,
    split: str = "test",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    limit: int | None = None,
    constrain: bool = True,
    progress: bool = True,
) -> dict:
    """Answer every photo of ``split`` with greedy decoding and score title, category and price against the
    truth and the train-split baselines; return the metrics.

    ``model``: a RUN, a checkpoint directory, a hub id or a ``LoadedModel``. ``out``: a metrics.json path or a
    directory (e.g. ``RUN/eval/after``), with predictions.jsonl beside it; None writes nothing. ``constrain``
    forces every answer into the run's template, the category one of the training split's.
    """
    check_range("batch_size", batch_size, low=1)
    check_range("max_new_tokens", max_new_tokens, low=1)
    check_range("limit", limit, low=1)
    from phivision.evaluate.evaluation import evaluate as run_evaluation

    return run_evaluation(
        model,
        data,
        split=split,
        out=out,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        progress=progress,
        constrain=constrain,
    )


def report(
    *,
    run: PathLike | None = None,
    predictions: PathLike | None = None,
    out: PathLike | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> Path:
    """Write one self-contained HTML report for a RUN (every stage in ``RUN/eval/``, its training curves, config
    and dataset) or one predictions.jsonl, and return its path (default ``RUN/report.html``, or ``report.html``
    beside the predictions). Headline metrics get 95% bootstrap intervals from ``resamples`` resamples (0: none)
    drawn with ``seed``."""
    check_range("resamples", resamples, low=0)
    from phivision.evaluate.report import write_report

    return write_report(run=run, predictions=predictions, out=out, resamples=resamples, seed=seed)


# ---------------------------------------------------------------------------------------------- serve


def predict(
    images: PathLike | Sequence[PathLike],
    model: PathLike | LoadedModel,
    *,
    out: PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str | None = None,
    constrain: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Answer for each photo and return one record per image, in order: ``image``, ``title``, ``category``,
    ``price``, ``currency`` and the raw ``answer``, or ``image`` and ``error`` for an image that could not be read.

    ``images``: files and/or directories of images (not recursive). ``out``: also write the records as JSON
    lines to this file (atomically), or ``"-"`` to stream them to stdout as they come.
    """
    check_range("batch_size", batch_size, low=1)
    check_range("max_new_tokens", max_new_tokens, low=1)
    from phivision.io import atomic_write_text
    from phivision.runs import LoadedModel
    from phivision.serve.predict import expand_inputs, predict_images

    paths = expand_inputs([images] if isinstance(images, (str, os.PathLike)) else list(images))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    records = []
    for record in predict_images(
        loaded,
        paths,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        constrain=constrain,
    ):
        records.append(record)
        if out is not None and str(out) == "-":
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    if out is not None and str(out) != "-":
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def serve(
    model: PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_batch_size: int = ServeLimits.max_batch_size,
    max_wait_ms: float = ServeLimits.max_wait_ms,
    max_batch_pixels: int = ServeLimits.max_batch_pixels,
    max_upload_mb: float = ServeLimits.max_upload_mb,
    max_pixels: int = ServeLimits.max_pixels,
    max_queue: int = ServeLimits.max_queue,
    max_queue_mb: float = ServeLimits.max_queue_mb,
    max_new_tokens: int = ServeLimits.max_new_tokens,
    body_timeout: float = ServeLimits.body_timeout,
    answer_timeout: float = ServeLimits.answer_timeout,
    allow_remote_images: bool = False,
    allow_private_image_hosts: bool = False,
    remote_image_timeout: float = ServeLimits.remote_image_timeout,
    constrain: bool = ServeLimits.constrain,
    allowed_host: Sequence[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Serve ``model`` (RUN, checkpoint or hub id) over HTTP until interrupted: the OpenAI-compatible
    ``/v1/chat/completions`` and ``/v1/models``, ``/v1/predict``, an upload page at /, /healthz and the API
    reference at /docs. Every argument is checked before the model loads (see docs/serving.md)."""
    check_range("port", port, low=1, high=65535)
    if allow_private_image_hosts and not allow_remote_images:
        raise PhivisionError("--allow-private-image-hosts needs --allow-remote-images")
    limits = ServeLimits(
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_batch_pixels=max_batch_pixels,
        max_upload_mb=max_upload_mb,
        max_pixels=max_pixels,
        max_queue=max_queue,
        max_queue_mb=max_queue_mb,
        max_new_tokens=max_new_tokens,
        body_timeout=body_timeout,
        answer_timeout=answer_timeout,
        remote_image_timeout=remote_image_timeout,
        constrain=constrain,
    ).validate()
    from phivision.netguard import AddressPolicy
    from phivision.serve.server import serve as run_server

    private = allow_private_image_hosts
    remote = AddressPolicy(allow_loopback=private, allow_private=private) if allow_remote_images else None
    run_server(
        str(model),
        host=host,
        port=port,
        limits=limits,
        device=device,
        dtype=dtype,
        served_model_name=served_model_name,
        allowed_host=tuple(allowed_host or ()),
        remote_images=remote,
    )


def export(run: PathLike, out: PathLike, *, dtype: str | None = None, max_shard_size: str = "4GB") -> Path:
    """Merge a RUN's LoRA adapter into its base (or re-save a full fine-tune) and write the official
    Phi-3-Vision checkpoint layout to ``out`` (which must not exist or be empty); return ``out``."""
    from phivision.serve.export import export_run

    return export_run(run, out, dtype=dtype, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------------------------- demo


def demo(
    out: PathLike = "phivision-demo",
    *,
    n: int = 600,
    seed: int = 0,
    config: PathLike | None = None,
    overrides: Sequence[str] | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """The whole path on a synthetic catalog and a tiny model: sample -> tiny checkpoint -> evaluate -> fine-tune
    -> evaluate -> report. Returns OUT/metrics.json's content (``before``, ``after``, ``baseline``).

    A rerun reuses each finished step whose inputs (n, seed, config, overrides, phivision version) are
    unchanged and recomputes the others (and everything downstream); ``fresh`` starts over.
    """
    check_range("n", n, low=1)
    from phivision.demo import run_demo

    return run_demo(
        out=out,
        n=n,
        seed=seed,
        config=config,
        overrides=list(overrides or []),
        fresh=fresh,
        progress=progress,
    )
