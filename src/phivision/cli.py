"""The ``phivision`` command line: thin wrappers that parse flags and call one :mod:`phivision.api` function each.

Every flag's default is read from the API function's signature (defined once, in the library). Nothing heavy is
imported at the top, so ``phivision --help`` answers at once; each verb imports its implementation when it runs.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from inspect import signature
from pathlib import Path
from typing import Annotated, Any

import typer

from phivision import api
from phivision.data import defaults
from phivision.errors import PhivisionError

try:  # typer >= 0.27 vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # older typer on click
    from click.exceptions import UsageError

    try:
        from click.exceptions import NoArgsIsHelpError
    except ImportError:  # click < 8.2 prints the help and exits 0 itself
        NoArgsIsHelpError = ()  # type: ignore[assignment,misc]

app = typer.Typer(
    name="phivision",
    help="Fine-tune Phi-3-Vision to read a product photo and answer with its name, category and price.\n\n"
    "The path: sample/prepare a dataset -> train -> evaluate -> report -> predict/serve/export. "
    "`phivision demo` runs all of it on a synthetic catalog and a tiny model. "
    "Every verb is also a Python function: `from phivision import train`.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: typer's rich formatter imports ~0.2 s of modules (markdown, pygments)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def default(function: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of an API function: the one place defaults are defined."""
    return signature(function).parameters[name].default


def _print_version(value: bool) -> None:
    if value:
        import phivision

        typer.echo(f"phivision {phivision.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


# ----------------------------------------------------------------------------------------------- data


@app.command()
def sample(
    out: Annotated[
        Path, typer.Option(help="Dataset directory to write (rerun the same command to redo it).")
    ],
    n: Annotated[
        int | None,
        typer.Option(
            help=f"Number of products [default: {defaults.SAMPLE_N}; with --like: as many as that dataset]."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Random seed (attributes, prices, drawings and split).")
    ] = default(api.sample, "seed"),
    split: Annotated[
        str | None,
        typer.Option(
            help=f"Train,val,test ratios [default: {defaults.SPLIT}; with --like: that dataset's ratios]."
        ),
    ] = None,
    like: Annotated[
        Path | None,
        typer.Option(
            help="Copy the structure of this dataset (categories and proportions, per-category prices, title "
            "patterns, image sizes, split ratios) without any of its titles or images."
        ),
    ] = None,
    urls_out: Annotated[
        Path | None,
        typer.Option(
            help="Also write a CSV of image URLs in the DBQ schema, to try `prepare` against a server."
        ),
    ] = None,
    base_url: Annotated[
        str, typer.Option(help="URL at which --out is served (e.g. `python -m http.server -d OUT 8000`).")
    ] = default(api.sample, "base_url"),
    overwrite: Annotated[
        bool, typer.Option(help="Replace another dataset found in --out (default: refuse).")
    ] = False,
) -> None:
    """Draw a synthetic catalog in the dataset layout: the shape shows the category; colour, pattern, trim
    (material) and size are visible and decide the price (+-5% noise), so a small model can learn both.

    With --like DIR, the catalog is shaped like DIR instead: a safe stand-in for tests, demos, load tests and
    bug reports.

    Example: phivision sample --out data/sample --n 600 --urls-out data/urls.csv
    """
    path = api.sample(
        out, n=n, seed=seed, split=split, urls_out=urls_out, base_url=base_url, like=like, overwrite=overwrite
    )
    from phivision.data.layout import load_catalog

    rows = len(load_catalog(path, check_images=False))
    shaped = f" shaped like {like}" if like else ""
    typer.echo(
        f"wrote {rows} synthetic products{shaped} to {path}"
        + (f" and image URLs to {urls_out}" if urls_out else "")
    )


@app.command()
def prepare(
    source: Annotated[
        list[str],
        typer.Option(
            help="Product table: a hub dataset id (e.g. DBQ/Burberry.Product.prices.United.States), a local "
            "dataset directory, or a .csv/.tsv/.parquet/.jsonl file. Repeat to combine several sources."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Dataset directory to write (rerun the same command to resume).")],
    title_col: Annotated[str, typer.Option(help="Column with the product name.")] = default(
        api.prepare, "title_col"
    ),
    category_col: Annotated[str, typer.Option(help="Column with the category.")] = default(
        api.prepare, "category_col"
    ),
    price_col: Annotated[
        str, typer.Option(help="Column with the full price ($1,290.00, 1.290,00 EUR, 1290, USD 1290.5).")
    ] = default(api.prepare, "price_col"),
    image_col: Annotated[str, typer.Option(help="Column with the image URL.")] = default(
        api.prepare, "image_col"
    ),
    code_col: Annotated[str, typer.Option(help="Column with the product code.")] = default(
        api.prepare, "code_col"
    ),
    currency_col: Annotated[str, typer.Option(help="Column with the currency code.")] = default(
        api.prepare, "currency_col"
    ),
    currency: Annotated[
        str | None, typer.Option(help="One currency for every row (then --currency-col is not needed).")
    ] = None,
    decimal_comma: Annotated[
        bool | None,
        typer.Option(
            "--decimal-comma/--decimal-point",
            help="The prices' decimal mark, for numbers that read two ways (1.290 is 1290 or 1.29). Default: "
            "each price column's majority of unambiguous values (stated in the report); none: such rows are "
            "dropped as ambiguous_price.",
            show_default=False,
        ),
    ] = None,
    max_price: Annotated[
        float, typer.Option(help="Drop prices above this as absurd_price (typos, placeholders).")
    ] = default(api.prepare, "max_price"),
    hub_split: Annotated[str, typer.Option(help="Split of a hub or local dataset to read.")] = default(
        api.prepare, "hub_split"
    ),
    hub_config: Annotated[
        str | None, typer.Option(help="Configuration (subset) name of a hub dataset.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Hub dataset revision (branch, tag or commit).")
    ] = None,
    split: Annotated[str, typer.Option(help="Train,val,test ratios, stratified by category.")] = default(
        api.prepare, "split"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = default(api.prepare, "seed"),
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows of each source.")] = None,
    concurrency: Annotated[int, typer.Option(help="Downloads in flight overall.")] = default(
        api.prepare, "concurrency"
    ),
    per_host: Annotated[int, typer.Option(help="Downloads in flight per host.")] = default(
        api.prepare, "per_host"
    ),
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection.")] = default(
        api.prepare, "connect_timeout"
    ),
    read_timeout: Annotated[float, typer.Option(help="Seconds to wait for the next bytes.")] = default(
        api.prepare, "read_timeout"
    ),
    download_timeout: Annotated[
        float,
        typer.Option(help="Seconds one download attempt may take in all (ends slow-drip responses)."),
    ] = default(api.prepare, "download_timeout"),
    retries: Annotated[
        int, typer.Option(help="Retries after connection errors, timeouts, 5xx and 429 (never other 4xx).")
    ] = default(api.prepare, "retries"),
    backoff: Annotated[
        float, typer.Option(help="First retry delay in seconds; doubles, with jitter.")
    ] = default(api.prepare, "backoff"),
    max_wait: Annotated[
        float, typer.Option(help="Cap in seconds on any backoff or Retry-After wait.")
    ] = default(api.prepare, "max_wait"),
    max_bytes: Annotated[
        int, typer.Option(help="Largest image file accepted, downloaded or local, in bytes.")
    ] = default(api.prepare, "max_bytes"),
    max_pixels: Annotated[
        int, typer.Option(help="Reject images with more pixels (decompression bombs).")
    ] = default(api.prepare, "max_pixels"),
    allow_local: Annotated[
        bool,
        typer.Option(
            help="Accept file:// URLs and local paths in the image column (regular files only; default: "
            "http(s) only)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace another dataset found in --out (default: refuse).")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build a dataset (catalog.parquet, images/, prepare_report.json) from product tables with image URLs.

    Downloads run concurrently with retries and a deadline each; every image is fully decoded before it counts;
    prices are read in any common locale; conflicting duplicates are resolved by a stated rule. A row that cannot
    be used (bad price, broken URL, failed download...) is dropped and listed with its reason in
    prepare_report.json; the run goes on. Link-local and cloud-metadata addresses are never fetched. Rerunning
    (also after a crash) reuses finished images and downloads nothing twice.

    Example: phivision prepare --source DBQ/Burberry.Product.prices.United.States --out data/burberry
    """
    report = api.prepare(
        source,
        out,
        title_col=title_col,
        category_col=category_col,
        price_col=price_col,
        image_col=image_col,
        code_col=code_col,
        currency_col=currency_col,
        currency=currency,
        decimal_comma=decimal_comma,
        max_price=max_price,
        hub_split=hub_split,
        hub_config=hub_config,
        revision=revision,
        split=split,
        seed=seed,
        limit=limit,
        concurrency=concurrency,
        per_host=per_host,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        download_timeout=download_timeout,
        retries=retries,
        backoff=backoff,
        max_wait=max_wait,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        allow_local=allow_local,
        overwrite=overwrite,
        progress=progress,
    )
    from phivision.data.prepare import summary

    typer.echo(summary(report))


@app.command()
def inspect(
    data: Annotated[Path, typer.Argument(help="Dataset directory (catalog.parquet + images/).")],
    out: Annotated[
        Path | None,
        typer.Option(help="HTML file to write [default: DATA/inspect.html]; the JSON goes beside it."),
    ] = None,
    num_crops: Annotated[
        str, typer.Option(help="num_crops values to cost in image tokens, comma-separated.")
    ] = default(api.inspect, "num_crops"),
    crop_size: Annotated[
        int, typer.Option(help="Tile side in pixels (official Phi-3-Vision: 336).")
    ] = default(api.inspect, "crop_size"),
    num_img_tokens: Annotated[int, typer.Option(help="Image tokens per tile (official: 144).")] = default(
        api.inspect, "num_img_tokens"
    ),
    near_duplicate_bits: Annotated[
        int,
        typer.Option(help="Images at most this many perceptual-hash bits apart (of 64) are near-duplicates."),
    ] = default(api.inspect, "near_duplicate_bits"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Look at a dataset before training: one offline HTML page (and a JSON beside it) with rows per split and
    category, prices per category, image sizes, image tokens per sample and per epoch for each num_crops,
    near-duplicate images across splits, colour variants, conflicting duplicates, placeholders and outliers.

    Example: phivision inspect data/burberry
    """
    result = api.inspect(
        data,
        out=out,
        num_crops=num_crops,
        crop_size=crop_size,
        num_img_tokens=num_img_tokens,
        near_duplicate_bits=near_duplicate_bits,
        progress=progress,
    )
    near, conflicts = result["near_duplicates"]["pairs"], result["conflicts"]["groups"]
    typer.echo(
        f"inspected {result['rows']} rows: {near} near-duplicate pair(s) across splits, {conflicts} conflicting "
        f"duplicate group(s); wrote {result['files']['html']} and {result['files']['json']}"
    )


# ---------------------------------------------------------------------------------------------- model


@app.command()
def tiny(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = default(api.tiny, "seed"),
    num_crops: Annotated[int, typer.Option(help="Most image tiles per image the processor makes.")] = default(
        api.tiny, "num_crops"
    ),
) -> None:
    """Write a tiny, randomly initialised Phi-3-Vision checkpoint in the official layout (for tests and demos).

    It has config.json, model.safetensors, tokenizer files, preprocessor_config.json and the model code, and
    loads like the real checkpoint (AutoModelForCausalLM / AutoProcessor, with trust_remote_code=True where
    phivision is not installed). OUT must not exist or be empty.
    """
    path = api.tiny(out, seed=seed, num_crops=num_crops)
    typer.echo(f"wrote tiny checkpoint to {path}")


# ---------------------------------------------------------------------------------------------- train


@app.command()
def train(
    out: Annotated[
        Path | None,
        typer.Option(help="Run directory to write (weights, processor, config, metrics, checkpoints)."),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset directory (catalog.parquet + images/).")] = None,
    model: Annotated[str | None, typer.Option(help="Base checkpoint: a local directory or a hub id.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Training YAML (e.g. configs/lora.yaml); default: built-in defaults.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out from its newest checkpoint (same data order, RNG, optimizer)."
        ),
    ] = default(api.train, "resume"),
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the resolved config as YAML (defaults, then --config, then --data/--model/--out, "
            "then overrides), checked, and exit without training.",
        ),
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides as dotted key=value, e.g. method=full optim.lr=1e-4 lora.r=32 "
            "(every key: docs/config.md)."
        ),
    ] = None,
) -> None:
    """Fine-tune Phi-3-Vision (LoRA, QLoRA or full) on a dataset; multi-GPU via `accelerate launch` or `torchrun`.

    Every config value is checked before anything loads; a bad one stops with one line naming the key.

    Example: phivision train --config configs/lora.yaml --data DATA --model microsoft/Phi-3-vision-128k-instruct --out runs/lora
    """
    if print_config:
        from phivision.train.config import cli_config

        cfg = cli_config(out, data=data, model=model, config=config, resume=resume, overrides=overrides or [])
        typer.echo(cfg.to_yaml(), nl=False)
        return
    if out is None:
        raise PhivisionError("--out is required: the run directory to write")
    result = api.train(out, data=data, model=model, config=config, resume=resume, overrides=overrides)
    metric = json.loads((result.out / "trainer_state.json").read_text())["metric"] if result.best_step else ""
    best = f", best {metric} {result.best_metric:.4f} at step {result.best_step}" if result.best_step else ""
    if os.environ.get("RANK", "0") == "0":  # one summary line under torchrun/accelerate, not one per process
        typer.echo(f"trained {result.steps} steps{best}; run written to {result.out}")


# ------------------------------------------------------------------------------------------- evaluate

CONSTRAIN_HELP = (
    "Force every answer into the run's answer template: the category one of the training split's categories "
    "(when the model records them), the price a positive number. --no-constrain lets the model write freely."
)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="Training RUN directory, checkpoint directory or hub id.")],
    data: Annotated[Path, typer.Option(help="Dataset directory (catalog.parquet + images/).")],
    out: Annotated[
        Path,
        typer.Option(
            help="metrics.json path, or a directory (e.g. RUN/eval/after); predictions.jsonl goes beside it."
        ),
    ],
    split: Annotated[str, typer.Option(help="Split to score: train, val or test.")] = default(
        api.evaluate, "split"
    ),
    batch_size: Annotated[int, typer.Option(help="Images per generation batch.")] = default(
        api.evaluate, "batch_size"
    ),
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated, in tokens.")] = default(
        api.evaluate, "max_new_tokens"
    ),
    limit: Annotated[int | None, typer.Option(help="Score only the first N items of the split.")] = None,
    constrain: Annotated[bool, typer.Option("--constrain/--no-constrain", help=CONSTRAIN_HELP)] = default(
        api.evaluate, "constrain"
    ),
) -> None:
    """Answer every photo of a split with greedy decoding and score price, category and title against the truth
    and the train-split baselines (median price, majority category)."""
    metrics = api.evaluate(
        model,
        data,
        out,
        split=split,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        constrain=constrain,
    )
    from phivision.evaluate.evaluation import output_paths, summary_table

    typer.echo(summary_table(metrics))
    if metrics["image_errors"]:
        typer.echo(
            f"warning: {metrics['image_errors']} unreadable image(s) were scored as failures", err=True
        )
    metrics_path, predictions_path = output_paths(out)
    typer.echo(f"wrote {metrics_path} and {predictions_path}")


@app.command()
def report(
    run: Annotated[
        Path | None, typer.Option(help="Training RUN whose eval/<stage>/ outputs to report.")
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="One predictions.jsonl (instead of --run).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="HTML file to write (default: RUN/report.html, or report.html beside the predictions)."
        ),
    ] = None,
    resamples: Annotated[
        int, typer.Option(help="Bootstrap resamples for the 95% intervals, 0 for none.")
    ] = default(api.report, "resamples"),
    seed: Annotated[
        int, typer.Option(help="Bootstrap seed: the same inputs give the same intervals.")
    ] = default(api.report, "seed"),
) -> None:
    """Write one self-contained HTML report (opens offline, runs no script): headline metrics with bootstrap
    95% intervals and the paired change from before to after, the dataset and the run's config, training curves,
    price plots, breakdowns by price band and by category (stages side by side), and the best and worst answers
    with their photos. A damaged training log is reported as a warning; a damaged predictions file is an error."""
    path = api.report(run=run, predictions=predictions, out=out, resamples=resamples, seed=seed)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- serve


@app.command()
def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Image files and/or directories of images (not recursive).")
    ],
    model: Annotated[str, typer.Option(help="Training RUN directory, checkpoint directory or hub id.")],
    out: Annotated[Path | None, typer.Option(help="JSON-lines file to write (default: stdout).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generation batch.")] = default(
        api.predict, "batch_size"
    ),
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated, in tokens.")] = default(
        api.predict, "max_new_tokens"
    ),
    device: Annotated[
        str | None, typer.Option(help="cuda, cpu, cuda:1... (default: cuda if available)")
    ] = None,
    constrain: Annotated[bool, typer.Option("--constrain/--no-constrain", help=CONSTRAIN_HELP)] = default(
        api.predict, "constrain"
    ),
) -> None:
    """Answer for each photo: one JSON line with image, title, category, price, currency and the raw answer.

    An unreadable image gets a line with an "error" field and the others go on. Exit code 0 when at least one
    image was answered, 1 when none could be read, 2 for a bad flag or path.
    """
    records = api.predict(
        images,
        model,
        out=out or "-",
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        constrain=constrain,
    )
    failed = sum("error" in record for record in records)
    answered = len(records) - failed
    if out is not None:
        typer.echo(f"wrote {answered + failed} line(s) to {out}", err=True)
    if failed:
        typer.echo(f"warning: {failed} image(s) could not be read (see their 'error' field)", err=True)
    if answered == 0:
        raise typer.Exit(code=1)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Training RUN directory, checkpoint directory or hub id.")],
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every interface).")] = default(
        api.serve, "host"
    ),
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = default(api.serve, "port"),
    served_model_name: Annotated[
        str | None, typer.Option(help="Model id of the OpenAI API (/v1/models). Default: --model as given.")
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(help="Most concurrent requests answered in one batch.")
    ] = default(api.serve, "max_batch_size"),
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a batch waits for more requests to join.")
    ] = default(api.serve, "max_wait_ms"),
    max_batch_pixels: Annotated[
        int, typer.Option(help="Decoded pixels one batch may hold (bounds memory; one image always fits).")
    ] = default(api.serve, "max_batch_pixels"),
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest image file accepted (bigger ones get 413).")
    ] = default(api.serve, "max_upload_mb"),
    max_pixels: Annotated[
        int, typer.Option(help="Largest image in pixels (bigger ones, e.g. decompression bombs, get 413).")
    ] = default(api.serve, "max_pixels"),
    max_queue: Annotated[
        int, typer.Option(help="Most requests waiting for the model (more get 503).")
    ] = default(api.serve, "max_queue"),
    max_queue_mb: Annotated[
        float, typer.Option(help="Most image bytes waiting for the model (more get 503).")
    ] = default(api.serve, "max_queue_mb"),
    max_new_tokens: Annotated[
        int, typer.Option(help="Longest answer generated, in tokens (the largest max_tokens accepted).")
    ] = default(api.serve, "max_new_tokens"),
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a client may take to send its request body (then 408).")
    ] = default(api.serve, "body_timeout"),
    answer_timeout: Annotated[
        float, typer.Option(help="Seconds a request may wait for its answer (then 504).")
    ] = default(api.serve, "answer_timeout"),
    allow_remote_images: Annotated[
        bool,
        typer.Option(
            help="Let chat requests give http(s) image URLs, fetched by the server (public addresses only; "
            "never link-local or cloud metadata addresses)."
        ),
    ] = False,
    allow_private_image_hosts: Annotated[
        bool,
        typer.Option(help="With --allow-remote-images: also fetch from loopback and private networks."),
    ] = False,
    remote_image_timeout: Annotated[
        float, typer.Option(help="Seconds for fetching one http(s) image, redirects included.")
    ] = default(api.serve, "remote_image_timeout"),
    constrain: Annotated[bool, typer.Option("--constrain/--no-constrain", help=CONSTRAIN_HELP)] = default(
        api.serve, "constrain"
    ),
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="A Host name to answer besides the loopback names (repeatable), e.g. the name a reverse "
            "proxy forwards. Bound to loopback, other names are refused (DNS rebinding)."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cuda, cpu, cuda:1... (default: cuda if available)")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu).")
    ] = None,
) -> None:
    """Serve the model over HTTP: the OpenAI-compatible POST /v1/chat/completions and GET /v1/models,
    POST /v1/predict (multipart field "image"), an upload page at /, /healthz, and the API reference at /docs
    (schema: /openapi.json). Every flag is checked before the model loads. See docs/serving.md."""
    api.serve(
        model,
        host=host,
        port=port,
        served_model_name=served_model_name,
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
        allow_remote_images=allow_remote_images,
        allow_private_image_hosts=allow_private_image_hosts,
        remote_image_timeout=remote_image_timeout,
        constrain=constrain,
        allowed_host=allowed_host,
        device=device,
        dtype=dtype,
    )


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="Training RUN directory (LoRA, QLoRA or full fine-tune).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to create (must not exist or be empty).")],
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: the base checkpoint's dtype).")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard, e.g. 4GB or 500MB.")
    ] = default(api.export, "max_shard_size"),
) -> None:
    """Merge the run's LoRA adapter into its base (or re-save a full fine-tune) into a standalone checkpoint.

    The official Phi-3-Vision layout plus phivision's model code and its auto_map: it loads with phivision, with
    plain transformers (trust_remote_code=True, phivision not needed) and with vLLM (see docs/serving.md).
    """
    path = api.export(run, out, dtype=dtype, max_shard_size=max_shard_size)
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------------------------- demo


# ----------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Output directory (dataset, tiny checkpoint, run, report).")
    ] = default(api.demo, "out"),
    n: Annotated[int, typer.Option(help="Products in the synthetic catalog.")] = default(api.demo, "n"),
    seed: Annotated[int, typer.Option(help="Seeds the catalog, the tiny weights and training.")] = default(
        api.demo, "seed"
    ),
    config: Annotated[
        Path | None, typer.Option(help="Training YAML to use instead of the packaged demo recipe.")
    ] = None,
    fresh: Annotated[
        bool, typer.Option(help="Delete --out first instead of reusing finished steps.")
    ] = default(api.demo, "fresh"),
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Training overrides as key=value, e.g. schedule.epochs=2.")
    ] = None,
) -> None:
    """The main job: synthetic catalog -> tiny Phi-3-Vision -> evaluate -> fine-tune -> evaluate -> report.

    Finishes in a few minutes on 2 CPU cores and writes OUT/metrics.json ({"before", "after", "baseline"})
    and OUT/report.html. Rerunning reuses what is already done.
    """
    api.demo(out, n=n, seed=seed, config=config, overrides=overrides, fresh=fresh)


# OSErrors that are about the machine, never about phivision's code: one line wherever they happen.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
# OSErrors about a file: one line when the file is (inside) a path given on the command line, else a bug.
PATH_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOTEMPTY,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


def _given_paths(args: list[str]) -> list[str]:
    """Every command-line token that could name a path: arguments, option values, ``key=value`` values."""
    tokens = [
        part for arg in args for part in (arg, arg.partition("=")[2]) if part and not part.startswith("-")
    ]
    return [os.path.abspath(os.path.expanduser(token)) for token in tokens]


def _on_given_path(path: str, given: list[str]) -> bool:
    """``path`` is a given path, inside one, or one of its parent directories (which phivision creates)."""
    path = os.path.abspath(path)
    inside = [(path, root) for root in given] + [(root, path) for root in given]
    return any(a == b or a.startswith(b.rstrip(os.sep) + os.sep) for a, b in inside)


def os_error_message(err: OSError, args: list[str]) -> str | None:
    """The one-line message for an OSError the user can act on, or None for one that must show its traceback.

    A full disk, a quota, a file-size limit or a read-only file system is the machine's state, never a bug: one
    line, naming the file when the error knows it. A permission, missing-file or not-a-directory error on a path
    given on the command line (a file inside it, or a parent directory of it) is the user's to fix: one line
    naming it. Any other OSError (on phivision's own files, a socket...) may be a bug: its traceback stays.
    """
    reason = err.strerror or str(err)
    names = [os.fsdecode(name) for name in (err.filename, err.filename2) if name is not None]
    where = " -> ".join(names)
    if err.errno in ENVIRONMENT_ERRNOS or (err.errno is None and "No space left on device" in str(err)):
        return f"{where}: {reason}" if where else f"{reason} (while writing a file)"
    given = _given_paths(args)
    if err.errno in PATH_ERRNOS and any(_on_given_path(name, given) for name in names):
        return f"{where}: {reason}"
    return None


def main(args: list[str] | None = None) -> None:
    """Console entry point. A user's mistake (PhivisionError, a bad flag, a full disk, an unreadable path they
    gave) becomes one ``error:`` line on stderr and exit code 2; a bug keeps its traceback (exit 1)."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        code = app(args=args, prog_name="phivision", standalone_mode=False)
    except PhivisionError as err:
        _fail(str(err))
    except NoArgsIsHelpError as err:  # `phivision` alone: the help (its message), not an error
        typer.echo(err.format_message())
        sys.exit(0)
    except UsageError as err:
        command = err.ctx.command_path if err.ctx is not None else "phivision"
        _fail(f"{err.format_message()} (see '{command} --help')", code=err.exit_code)
    except typer.Abort:
        _fail("aborted", code=130)
    except OSError as err:
        message = os_error_message(err, args)
        if message is None:
            raise
        _fail(message)
    sys.exit(code or 0)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)  # one line, whatever the message holds
    sys.exit(code)


if __name__ == "__main__":
    main()
