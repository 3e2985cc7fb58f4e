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


# ------------------------------------------------------------------------------------------- evaluate


# ---------------------------------------------------------------------------------------------- serve


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except PhivisionError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
