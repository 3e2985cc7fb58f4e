"""The ``phivision`` command line: thin wrappers that parse flags and call one library function each.

Each verb imports its implementation lazily so ``phivision --help`` stays fast.
"""

from __future__ import annotations

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
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Draw a synthetic catalog (images whose look decides category and price) in the dataset layout."""
    from phivision.data.sample import write_sample_catalog

    write_sample_catalog(out, n=n, seed=seed)


# ---------------------------------------------------------------------------------------------- model


@app.command()
def tiny(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
) -> None:
    """Write a tiny, randomly initialised Phi-3-Vision checkpoint in the official layout (for tests and demos)."""
    from phivision.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(out, seed=seed)
    typer.echo(f"wrote tiny checkpoint to {path}")


# ---------------------------------------------------------------------------------------------- train


@app.command()
def train(
    out: Annotated[
        Path, typer.Option(help="Run directory to write (weights, processor, config, metrics, checkpoints).")
    ],
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
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides as dotted key=value, e.g. method=full optim.lr=1e-4 lora.r=32."
        ),
    ] = None,
) -> None:
    """Fine-tune Phi-3-Vision (LoRA, QLoRA or full) on a dataset; multi-GPU via `accelerate launch` or `torchrun`."""
    from phivision.train import train as run_training
    from phivision.train.config import cli_config

    cfg = cli_config(out, data=data, model=model, config=config, resume=resume, overrides=overrides or [])
    result = run_training(cfg, resume=resume)
    best = (
        f", best {cfg.eval.metric} {result.best_metric:.4f} at step {result.best_step}"
        if result.best_step
        else ""
    )
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
        typer.Option(help="HTML file to write [default: RUN/report.html, or beside the predictions]."),
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
    out: Annotated[Path | None, typer.Option(help="JSON-lines file to write [default: stdout].")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generation batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated, in tokens.")] = 64,
    device: Annotated[
        str | None, typer.Option(help="cuda, cpu, cuda:1... [default: cuda if available]")
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
        str | None, typer.Option(help="cuda, cpu, cuda:1... [default: cuda if available]")
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
        str | None, typer.Option(help="float32, bfloat16 or float16 [default: the base checkpoint's dtype].")
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


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except PhivisionError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
