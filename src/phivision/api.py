"""The Python API: one function per CLI verb, with the CLI's names and defaults.

``from phivision import sample, prepare, inspect, tiny, train, evaluate, report, load_model, predict, serve,
export, demo``. Each function's keyword arguments are its verb's options, declared once in :mod:`phivision.args`
(``inspect.signature(phivision.prepare)`` shows them with their defaults); a call checks every value there (the
CLI's one-line messages, raising :class:`~phivision.errors.PhivisionError`) and hands the validated group to the
library. Each function imports its implementation when called, so ``import phivision`` stays light (no torch,
transformers, pandas or FastAPI until a function is called).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from phivision.args import (
    DemoArgs,
    EvaluateArgs,
    ExportArgs,
    InspectArgs,
    LoadArgs,
    PredictArgs,
    PrepareArgs,
    ReportArgs,
    SampleArgs,
    ServeArgs,
    TinyArgs,
    TrainArgs,
    byte_size,
)
from phivision.options import verb

if TYPE_CHECKING:
    from phivision.runs import LoadedModel
    from phivision.train.loop import TrainResult

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

# ----------------------------------------------------------------------------------------------- data


@verb(SampleArgs)
def sample(args: SampleArgs) -> Path:
    """Draw a synthetic catalog into ``out`` (the dataset layout) and return ``out``.

    The shape shows the category; colour, pattern, trim and size are visible and decide the price, so a small
    model can learn both. ``n``: products (default 600, or with ``like`` as many as that dataset); ``split``:
    train,val,test ratios (default 0.8,0.1,0.1, or ``like``'s); ``urls_out`` also writes a CSV of image URLs
    (DBQ schema, served at ``base_url``) to try :func:`prepare` against a local server. ``like``: copy that
    dataset's structure (categories, prices, title patterns, image sizes, splits), none of its content. An
    ``out`` holding another dataset is refused unless ``overwrite``.
    """
    from phivision.data.sample import sample as run_sample

    return run_sample(args)


@verb(PrepareArgs)
def prepare(args: PrepareArgs) -> dict:
    """Build a dataset in ``out`` from product tables with image URLs; return the report (also written to
    ``out/prepare_report.json``).

    ``source``: a hub dataset id, a local dataset directory, or a .csv/.tsv/.parquet/.jsonl file (or a list of
    them). The ``*_col`` arguments name the source columns; prices are read in any common locale
    (``decimal_comma`` fixes the decimal mark; default: each column's majority); downloads run ``concurrency``
    at a time (``per_host`` per host) with ``retries`` and a ``download_timeout`` each. A row that cannot be
    used is dropped with a reason in the report; the run goes on. Rerunning resumes; an ``out`` holding another
    dataset is refused unless ``overwrite``.
    """
    from phivision.data.prepare import prepare as run_prepare

    return run_prepare(args)


@verb(InspectArgs)
def inspect(args: InspectArgs) -> dict:
    """Look at a dataset before training: write an offline HTML page (default ``DATA/inspect.html``) and a JSON
    beside it, and return the JSON's content (rows per split and category, prices, image sizes, image tokens
    per sample for each ``num_crops``, near-duplicates across splits, conflicts, outliers)."""
    from phivision.data.inspection import inspect as run_inspect

    return run_inspect(args)


# ---------------------------------------------------------------------------------------------- model


@verb(TinyArgs)
def tiny(args: TinyArgs) -> Path:
    """Write a tiny, randomly initialised Phi-3-Vision checkpoint in the official layout to ``out`` (which must
    not exist or be empty) and return it; ``num_crops`` is the processor's most image tiles per image."""
    from phivision.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(args.out, seed=args.seed, num_crops=args.num_crops)


@verb(LoadArgs)
def load_model(args: LoadArgs) -> LoadedModel:
    """Load a training RUN directory, a checkpoint directory or a hub id for inference.

    Returns a ``LoadedModel`` (model, processor, the prompt format it was trained with, source). ``device``:
    default cuda when available; ``dtype``: default from :func:`phivision.runs.resolve_dtype`; ``merge`` folds a
    LoRA adapter into the base weights.
    """
    from phivision.runs import load_model as run_load_model

    return run_load_model(args.model, device=args.loading.device, dtype=args.loading.dtype, merge=args.merge)


# ---------------------------------------------------------------------------------------------- train


@verb(TrainArgs)
def train(args: TrainArgs) -> TrainResult:
    """Fine-tune Phi-3-Vision (LoRA, QLoRA or full) and write the run to ``out``; return a ``TrainResult``.

    The config is the built-in defaults <- ``config`` (a YAML path, or a ``TrainConfig``; on ``resume`` without
    one, the run's own config.yaml) <- ``data``/``model``/``out`` <- ``overrides`` (``"optim.lr=1e-4"``...).
    """
    from phivision.train.config import resolve_config
    from phivision.train.loop import train as run_training

    return run_training(resolve_config(args), resume=args.resume, progress=args.progress)


# ------------------------------------------------------------------------------------------- evaluate


@verb(EvaluateArgs)
def evaluate(args: EvaluateArgs) -> dict:
    """Answer every photo of ``split`` with greedy decoding and score title, category and price against the
    truth and the train-split baselines; return the metrics.

    ``model``: a RUN, a checkpoint directory, a hub id or a ``LoadedModel``. ``out``: a metrics.json path or a
    directory (e.g. ``RUN/eval/after``), with predictions.jsonl beside it; None writes nothing. ``constrain``
    forces every answer into the run's template, the category one of the training split's.
    """
    from phivision.evaluate.evaluation import evaluate as run_evaluation

    return run_evaluation(args)


@verb(ReportArgs)
def report(args: ReportArgs) -> Path:
    """Write one self-contained HTML report for a RUN (every stage in ``RUN/eval/``, its training curves, config
    and dataset) or one predictions.jsonl, and return its path (default ``RUN/report.html``, or ``report.html``
    beside the predictions). Headline metrics get 95% bootstrap intervals from ``resamples`` resamples (0: none)
    drawn with ``seed``."""
    from phivision.evaluate.report import write_report

    return write_report(args)


# ---------------------------------------------------------------------------------------------- serve


@verb(PredictArgs)
def predict(args: PredictArgs) -> list[dict]:
    """Answer for each photo and return one record per image, in order: ``image``, ``title``, ``category``,
    ``price``, ``currency`` and the raw ``answer``, or ``image`` and ``error`` for an image that could not be read.

    ``images``: files and/or directories of images (not recursive). ``out``: also write the records as JSON
    lines to this file (atomically), or ``"-"`` to stream them to stdout as they come.
    """
    from phivision.serve.predict import predict as run_predict

    return run_predict(args)


@verb(ServeArgs)
def serve(args: ServeArgs) -> None:
    """Serve ``model`` (RUN, checkpoint or hub id) over HTTP until interrupted: the OpenAI-compatible
    ``/v1/chat/completions`` and ``/v1/models``, ``/v1/predict``, an upload page at /, /healthz and the API
    reference at /docs. Every argument is checked before the model loads (see docs/serving.md)."""
    from phivision.serve.server import serve as run_server

    run_server(args)


@verb(ExportArgs)
def export(args: ExportArgs) -> Path:
    """Merge a RUN's LoRA adapter into its base (or re-save a full fine-tune) and write the official
    Phi-3-Vision checkpoint layout to ``out`` (which must not exist or be empty); return ``out``."""
    from phivision.serve.export import export_run

    return export_run(args.run, args.out, dtype=args.dtype, max_shard_size=byte_size(args.max_shard_size))


# ----------------------------------------------------------------------------------------------- demo


@verb(DemoArgs)
def demo(args: DemoArgs) -> dict[str, Any]:
    """The whole path on a synthetic catalog and a tiny model: sample -> tiny checkpoint -> evaluate -> fine-tune
    -> evaluate -> report. Returns OUT/metrics.json's content (``before``, ``after``, ``baseline``).

    A rerun reuses each finished step whose inputs (n, seed, config, overrides, phivision version) are
    unchanged and recomputes the others (and everything downstream); ``fresh`` starts over.
    """
    from phivision.threads import quiet_openmp_waits

    quiet_openmp_waits()  # before phivision.demo imports torch: OpenMP reads the setting once, when torch loads
    from phivision.demo import run_demo

    return run_demo(args)
