"""The ``phivision`` command line: thin wrappers that parse flags and call one library function each.

Each verb imports its implementation lazily so ``phivision --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from phivision.errors import PhivisionError

app = typer.Typer(
    name="phivision",
    help="Fine-tune Phi-3-Vision to read a product photo and answer with its name, category and price.\n\n"
    "The path: sample/prepare a dataset -> train -> evaluate -> report -> predict/serve/export. "
    "`phivision demo` runs all of it on a synthetic catalog and a tiny model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ----------------------------------------------------------------------------------------------- data


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    n: Annotated[int, typer.Option(help="Number of products.")] = 600,
    seed: Annotated[int, typer.Option(help="Random seed (attributes, prices, drawings and split).")] = 0,
    split: Annotated[str, typer.Option(help="Train,val,test ratios.")] = "0.8,0.1,0.1",
    urls_out: Annotated[
        Path | None,
        typer.Option(
            help="Also write a CSV of image URLs in the DBQ schema, to try `prepare` against a server."
        ),
    ] = None,
    base_url: Annotated[
        str, typer.Option(help="URL at which --out is served (e.g. `python -m http.server -d OUT 8000`).")
    ] = "http://127.0.0.1:8000",
) -> None:
    """Draw a synthetic catalog in the dataset layout: the shape shows the category; colour, pattern, trim
    (material) and size are visible and decide the price (+-5% noise), so a small model can learn both.

    Example: phivision sample --out data/sample --n 600 --urls-out data/urls.csv
    """
    from phivision.data.sample import write_sample_catalog
    from phivision.data.split import parse_ratios

    write_sample_catalog(out, n=n, seed=seed, split=parse_ratios(split), urls_out=urls_out, base_url=base_url)
    typer.echo(
        f"wrote {n} synthetic products to {out}" + (f" and image URLs to {urls_out}" if urls_out else "")
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
    out: Annotated[Path, typer.Option(help="Dataset directory to write (rerun to resume).")],
    title_col: Annotated[str, typer.Option(help="Column with the product name.")] = "title",
    category_col: Annotated[str, typer.Option(help="Column with the category.")] = "category3_code",
    price_col: Annotated[
        str, typer.Option(help="Column with the full price ($1,290.00, 1290, USD 1290.5).")
    ] = "full_price",
    image_col: Annotated[str, typer.Option(help="Column with the image URL.")] = "imageurl",
    code_col: Annotated[str, typer.Option(help="Column with the product code.")] = "product_code",
    currency_col: Annotated[str, typer.Option(help="Column with the currency code.")] = "currency_code",
    currency: Annotated[
        str | None, typer.Option(help="One currency for every row (then --currency-col is not needed).")
    ] = None,
    hub_split: Annotated[str, typer.Option(help="Split of a hub or local dataset to read.")] = "train",
    hub_config: Annotated[
        str | None, typer.Option(help="Configuration (subset) name of a hub dataset.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Hub dataset revision (branch, tag or commit).")
    ] = None,
    split: Annotated[
        str, typer.Option(help="Train,val,test ratios, stratified by category.")
    ] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows of each source.")] = None,
    concurrency: Annotated[int, typer.Option(help="Downloads in flight overall.")] = 64,
    per_host: Annotated[int, typer.Option(help="Downloads in flight per host.")] = 32,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection.")] = 10.0,
    read_timeout: Annotated[float, typer.Option(help="Seconds to wait for data.")] = 30.0,
    retries: Annotated[
        int, typer.Option(help="Retries after connection errors, timeouts, 5xx and 429 (never other 4xx).")
    ] = 3,
    backoff: Annotated[float, typer.Option(help="First retry delay in seconds; doubles, with jitter.")] = 0.5,
    max_wait: Annotated[
        float, typer.Option(help="Cap in seconds on any backoff or Retry-After wait.")
    ] = 30.0,
    max_pixels: Annotated[
        int, typer.Option(help="Reject images with more pixels (decompression bombs).")
    ] = 40_000_000,
    allow_local: Annotated[
        bool,
        typer.Option(help="Accept file:// URLs and local paths in the image column (default: http(s) only)."),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build a dataset (catalog.parquet, images/, prepare_report.json) from product tables with image URLs.

    Downloads run concurrently with retries; every image is fully decoded before it counts; prices are cleaned;
    rows without a usable title, category, price or image are dropped and listed with their reason in
    prepare_report.json. Rerunning (also after a crash) reuses finished images and downloads nothing twice.

    Example: phivision prepare --source DBQ/Burberry.Product.prices.United.States --out data/burberry
    """
    from phivision.data.download import DownloadConfig
    from phivision.data.prepare import Columns, summary
    from phivision.data.prepare import prepare as run_prepare

    for flag, value in (
        ("--concurrency", concurrency),
        ("--per-host", per_host),
        ("--max-pixels", max_pixels),
    ):
        if value < 1:
            raise PhivisionError(f"{flag} {value}: must be at least 1")
    if retries < 0 or min(connect_timeout, read_timeout) <= 0:
        raise PhivisionError("--retries must be >= 0 and timeouts > 0")
    columns = Columns(title_col, category_col, price_col, image_col, code_col, currency_col)
    download = DownloadConfig(
        concurrency=concurrency,
        per_host=per_host,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries=retries,
        backoff=backoff,
        max_wait=max_wait,
        max_pixels=max_pixels,
        allow_local=allow_local,
    )
    report = run_prepare(
        source,
        out,
        columns=columns,
        currency=currency,
        hub_split=hub_split,
        hub_config=hub_config,
        revision=revision,
        split=split,
        seed=seed,
        download=download,
        limit=limit,
        progress=progress,
    )
    typer.echo(summary(report))


# ---------------------------------------------------------------------------------------------- model


@app.command()
def tiny(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
    num_crops: Annotated[int, typer.Option(help="Most image tiles per image the processor makes.")] = 4,
) -> None:
    """Write a tiny, randomly initialised Phi-3-Vision checkpoint in the official layout (for tests and demos).

    It has config.json, model.safetensors, tokenizer files and preprocessor_config.json, and loads like the real
    checkpoint (AutoModelForCausalLM / AutoProcessor). OUT must not exist or be empty.
    """
    from phivision.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(out, seed=seed, num_crops=num_crops)
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
    ] = False,
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
    from phivision.train.config import cli_config

    cfg = cli_config(out, data=data, model=model, config=config, resume=resume, overrides=overrides or [])
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    if out is None:
        raise PhivisionError("--out is required: the run directory to write")
    from phivision.train import train as run_training

    result = run_training(cfg, resume=resume)
    best = (
        f", best {cfg.eval.metric} {result.best_metric:.4f} at step {result.best_step}"
        if result.best_step
        else ""
    )
    if os.environ.get("RANK", "0") == "0":  # one summary line under torchrun/accelerate, not one per process
        typer.echo(f"trained {result.steps} steps{best}; run written to {result.out}")


# ------------------------------------------------------------------------------------------- evaluate


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
    split: Annotated[str, typer.Option(help="Split to score: train, val or test.")] = "test",
    batch_size: Annotated[int, typer.Option(help="Images per generation batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated, in tokens.")] = 64,
    limit: Annotated[int | None, typer.Option(help="Score only the first N items of the split.")] = None,
) -> None:
    """Answer every photo of a split with greedy decoding and score price, category and title against the truth
    and the train-split baselines (median price, majority category)."""
    from phivision.evaluate.evaluation import evaluate as run_evaluation
    from phivision.evaluate.evaluation import output_paths, summary_table

    metrics = run_evaluation(
        model, data, split=split, out=out, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit
    )
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
) -> None:
    """Write one self-contained HTML report: headline table (before, after, baseline), price plots, category
    confusion matrix, per-category table and the best and worst predictions with their photos."""
    from phivision.evaluate.report import write_report

    path = write_report(run=run, predictions=predictions, out=out)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- serve


@app.command()
def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Image files and/or directories of images (not recursive).")
    ],
    model: Annotated[str, typer.Option(help="Training RUN directory, checkpoint directory or hub id.")],
    out: Annotated[Path | None, typer.Option(help="JSON-lines file to write (default: stdout).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generation batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated, in tokens.")] = 64,
    device: Annotated[
        str | None, typer.Option(help="cuda, cpu, cuda:1... (default: cuda if available)")
    ] = None,
) -> None:
    """Answer for each photo: one JSON line with image, title, category, price and the raw answer.

    An unreadable image gets a line with an "error" field and the others go on. Exit code 0 when at least one
    image was answered, 1 when none could be read, 2 for a bad flag or path.
    """
    from phivision.serve.predict import run_predict

    answered, failed = run_predict(
        model, images, out=out, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
    )
    if out is not None:
        typer.echo(f"wrote {answered + failed} line(s) to {out}", err=True)
    if failed:
        typer.echo(f"warning: {failed} image(s) could not be read (see their 'error' field)", err=True)
    if answered == 0:
        raise typer.Exit(code=1)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Training RUN directory, checkpoint directory or hub id.")],
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(help="Most concurrent requests answered in one batch.")] = 8,
    max_wait_ms: Annotated[
        float, typer.Option(help="How long a batch waits for more requests to join.")
    ] = 10.0,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest upload accepted (bigger ones get 413).")
    ] = 10.0,
    max_pixels: Annotated[
        int, typer.Option(help="Largest image in pixels (bigger ones, e.g. decompression bombs, get 413).")
    ] = 40_000_000,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated, in tokens.")] = 64,
    device: Annotated[
        str | None, typer.Option(help="cuda, cpu, cuda:1... (default: cuda if available)")
    ] = None,
) -> None:
    """Serve the model over HTTP: POST /v1/predict (multipart field "image"), an upload page at /, /healthz,
    and the OpenAPI schema at /openapi.json (interactive docs at /docs)."""
    from phivision.serve.server import ServeLimits
    from phivision.serve.server import serve as run_server

    if max_batch_size < 1 or max_upload_mb <= 0 or max_pixels < 1:
        raise PhivisionError("--max-batch-size, --max-upload-mb and --max-pixels must be positive")
    limits = ServeLimits(
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
        max_pixels=max_pixels,
        max_new_tokens=max_new_tokens,
    )
    run_server(model, host=host, port=port, limits=limits, device=device)


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="Training RUN directory (LoRA, QLoRA or full fine-tune).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to create (must not exist or be empty).")],
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: the base checkpoint's dtype).")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard, e.g. 4GB or 500MB.")
    ] = "4GB",
) -> None:
    """Merge the run's LoRA adapter into its base (or re-save a full fine-tune) and write the official
    Phi-3-Vision checkpoint layout, loadable by phivision, transformers and vLLM (see docs/serving.md)."""
    from phivision.serve.export import export_run

    path = export_run(run, out, dtype=dtype, max_shard_size=max_shard_size)
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Output directory (dataset, tiny checkpoint, run, report).")
    ] = Path("phivision-demo"),
    n: Annotated[int, typer.Option(help="Products in the synthetic catalog.")] = 600,
    seed: Annotated[int, typer.Option(help="Seeds the catalog, the tiny weights and training.")] = 0,
    config: Annotated[
        Path | None, typer.Option(help="Training YAML to use instead of the packaged demo recipe.")
    ] = None,
    fresh: Annotated[
        bool, typer.Option(help="Delete --out first instead of reusing finished steps.")
    ] = False,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Training overrides as key=value, e.g. schedule.epochs=2.")
    ] = None,
) -> None:
    """The main job: synthetic catalog -> tiny Phi-3-Vision -> evaluate -> fine-tune -> evaluate -> report.

    Finishes in a few minutes on 2 CPU cores and writes OUT/metrics.json ({"before", "after", "baseline"})
    and OUT/report.html. Rerunning reuses what is already done.
    """
    from phivision.demo import run_demo

    run_demo(out=out, n=n, seed=seed, config=config, overrides=overrides, fresh=fresh)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except PhivisionError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
