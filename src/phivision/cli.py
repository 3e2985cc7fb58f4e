"""The ``phivision`` command line: each verb's flags are made from its option group (:mod:`phivision.args`), each
command calls its :mod:`phivision.api` function and prints what it did.

A flag is an option's declaration rendered for typer: its help with the allowed range or choices, its default,
``--x/--no-x`` for a boolean. Values are checked by the API call (one checker, the same messages in Python and on
the command line). Nothing heavy is imported at the top, so ``phivision --help`` answers at once; each verb imports
what it prints with when it runs.
"""

from __future__ import annotations

import errno
import inspect as pyinspect
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from phivision import api
from phivision.args import TrainArgs
from phivision.errors import PhivisionError
from phivision.options import REQUIRED, build, constraint, field_default, leaves
from phivision.version import __version__

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


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"phivision {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


# ------------------------------------------------------------------------------------- flags from groups


def _cli_type(tp: Any) -> Any:
    """The type typer parses: the first of a union's types (``str | LoadedModel``: str); paths as text, so
    that an empty path reaches the API's check instead of becoming ``.``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _cli_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is list:
        return list[_cli_type(typing.get_args(tp)[0])]
    return str if tp is Path else tp


def parameter(field: Any, tp: Any) -> pyinspect.Parameter:
    """One typer parameter from one option's declaration."""
    spec = field.metadata
    default = field_default(field)
    required = default is REQUIRED if spec.get("cli_required") is None else spec["cli_required"]
    default = ... if required else (None if default is REQUIRED else default)
    default = str(default) if isinstance(default, Path) else default
    words = constraint(spec)
    help_text = spec.get("help", "") + (f"  [{words}]" if words else "")
    path = Path in (tp, *typing.get_args(tp), *[a for t in typing.get_args(tp) for a in typing.get_args(t)])
    extra = {"metavar": "<path>"} if path and not spec.get("argument") else {}
    if spec.get("argument"):
        info: Any = typer.Argument(default, help=help_text, show_default=default is not None)
    else:
        info = typer.Option(
            default, *spec.get("flags", ()), help=help_text, show_default=default is not None, **extra
        )
    return pyinspect.Parameter(
        field.name, pyinspect.Parameter.KEYWORD_ONLY, default=info, annotation=_cli_type(tp)
    )


def command(function: Callable[..., Any], name: str | None = None) -> Callable[[Callable], Callable]:
    """Register ``phivision NAME``: its flags are the options of ``function.__options__`` (a :mod:`phivision.api`
    function); the decorated ``show(values)`` runs it and prints, and its docstring is the verb's help."""

    def register(show: Callable[[dict[str, Any]], None]) -> Callable:
        params = [parameter(f, tp) for f, tp in leaves(function.__options__) if f.metadata.get("cli", True)]

        def callback(**values: Any) -> None:
            show(values)

        callback.__signature__ = pyinspect.Signature(params)  # type: ignore[attr-defined]
        callback.__doc__ = show.__doc__
        app.command(name or function.__name__)(callback)
        return show

    return register


# ----------------------------------------------------------------------------------------------- data


@command(api.sample)
def sample(values: dict[str, Any]) -> None:
    """Draw a synthetic catalog in the dataset layout: the shape shows the category; colour, pattern, trim
    (material) and size are visible and decide the price (+-5% noise), so a small model can learn both.

    With --like DIR, the catalog is shaped like DIR instead: a safe stand-in for tests, demos, load tests and
    bug reports.

    Example: phivision sample --out data/sample --n 600 --urls-out data/urls.csv
    """
    path = api.sample(**values)
    from phivision.data.layout import load_catalog

    rows = len(load_catalog(path, check_images=False))
    shaped = f" shaped like {values['like']}" if values["like"] else ""
    urls = f" and image URLs to {values['urls_out']}" if values["urls_out"] else ""
    typer.echo(f"wrote {rows} synthetic products{shaped} to {path}{urls}")


@command(api.prepare)
def prepare(values: dict[str, Any]) -> None:
    """Build a dataset (catalog.parquet, images/, prepare_report.json) from product tables with image URLs.

    Downloads run concurrently with retries and a deadline each; every image is fully decoded before it counts;
    prices are read in any common locale; conflicting duplicates are resolved by a stated rule. A row that cannot
    be used (bad price, broken URL, failed download...) is dropped and listed with its reason in
    prepare_report.json; the run goes on. Link-local and cloud-metadata addresses are never fetched. Rerunning
    (also after a crash) reuses finished images and downloads nothing twice.

    Example: phivision prepare --source DBQ/Burberry.Product.prices.United.States --out data/burberry
    """
    report = api.prepare(**values)
    from phivision.data.prepare import summary

    typer.echo(summary(report))


@command(api.inspect)
def inspect(values: dict[str, Any]) -> None:
    """Look at a dataset before training: one offline HTML page (and a JSON beside it) with rows per split and
    category, prices per category, image sizes, image tokens per sample and per epoch for each num_crops,
    near-duplicate images across splits, colour variants, conflicting duplicates, placeholders and outliers.

    Example: phivision inspect data/burberry
    """
    result = api.inspect(**values)
    near, conflicts = result["near_duplicates"]["pairs"], result["conflicts"]["groups"]
    typer.echo(
        f"inspected {result['rows']} rows: {near} near-duplicate pair(s) across splits, {conflicts} conflicting "
        f"duplicate group(s); wrote {result['files']['html']} and {result['files']['json']}"
    )


# ---------------------------------------------------------------------------------------------- model


@command(api.tiny)
def tiny(values: dict[str, Any]) -> None:
    """Write a tiny, randomly initialised Phi-3-Vision checkpoint in the official layout (for tests and demos).

    It has config.json, model.safetensors, tokenizer files, preprocessor_config.json and the model code, and
    loads like the real checkpoint (AutoModelForCausalLM / AutoProcessor, with trust_remote_code=True where
    phivision is not installed). OUT must not exist or be empty.
    """
    typer.echo(f"wrote tiny checkpoint to {api.tiny(**values)}")


# ---------------------------------------------------------------------------------------------- train


@command(api.train)
def train(values: dict[str, Any]) -> None:
    """Fine-tune Phi-3-Vision (LoRA, QLoRA or full) on a dataset; multi-GPU via `accelerate launch` or `torchrun`.

    Every config value is checked before anything loads; a bad one stops with one line naming the key.

    Example: phivision train --config configs/lora.yaml --data DATA --model microsoft/Phi-3-vision-128k-instruct --out runs/lora
    """
    if values.pop("print_config"):
        from phivision.train.config import resolve_config

        typer.echo(resolve_config(build(TrainArgs, values).validate()).to_yaml(), nl=False)
        return
    if values["out"] is None:
        raise PhivisionError("--out is required: the run directory to write")
    result = api.train(**values)
    if result.best_step:
        from phivision.data.layout import RunLayout

        metric = json.loads(RunLayout(result.out).trainer_state.read_text())["metric"]
        best = f", best {metric} {result.best_metric:.4f} at step {result.best_step}"
    else:
        best = ""
    if os.environ.get("RANK", "0") == "0":  # one summary line under torchrun/accelerate, not one per process
        typer.echo(f"trained {result.steps} steps{best}; run written to {result.out}")


# ------------------------------------------------------------------------------------------- evaluate


@command(api.evaluate)
def evaluate(values: dict[str, Any]) -> None:
    """Answer every photo of a split with greedy decoding and score price, category and title against the truth
    and the train-split baselines (median price, majority category)."""
    metrics = api.evaluate(**values)
    from phivision.evaluate.evaluation import output_paths, summary_table

    typer.echo(summary_table(metrics))
    if metrics["image_errors"]:
        typer.echo(
            f"warning: {metrics['image_errors']} unreadable image(s) were scored as failures", err=True
        )
    metrics_path, predictions_path = output_paths(values["out"])
    typer.echo(f"wrote {metrics_path} and {predictions_path}")


@command(api.report)
def report(values: dict[str, Any]) -> None:
    """Write one self-contained HTML report (opens offline, runs no script): headline metrics with bootstrap
    95% intervals and the paired change from before to after, the dataset and the run's config, training curves,
    price plots, breakdowns by price band and by category (stages side by side), and the best and worst answers
    with their photos. A damaged training log is reported as a warning; a damaged predictions file is an error."""
    typer.echo(f"wrote {api.report(**values)}")


# ---------------------------------------------------------------------------------------------- serve


@command(api.predict)
def predict(values: dict[str, Any]) -> None:
    """Answer for each photo: one JSON line with image, title, category, price, currency and the raw answer.

    An unreadable image gets a line with an "error" field and the others go on. Exit code 0 when at least one
    image was answered, 1 when none could be read, 2 for a bad flag or path.
    """
    out = values["out"]
    records = api.predict(**{**values, "out": out or "-"})
    failed = sum("error" in record for record in records)
    if out is not None:
        typer.echo(f"wrote {len(records)} line(s) to {out}", err=True)
    if failed:
        typer.echo(f"warning: {failed} image(s) could not be read (see their 'error' field)", err=True)
    if failed == len(records):
        raise typer.Exit(code=1)


@command(api.serve)
def serve(values: dict[str, Any]) -> None:
    """Serve the model over HTTP: the OpenAI-compatible POST /v1/chat/completions and GET /v1/models,
    POST /v1/predict (multipart field "image"), an upload page at /, /healthz, and the API reference at /docs
    (schema: /openapi.json). Every flag is checked before the model loads. See docs/serving.md."""
    api.serve(**values)


@command(api.export)
def export(values: dict[str, Any]) -> None:
    """Merge the run's LoRA adapter into its base (or re-save a full fine-tune) into a standalone checkpoint.

    The official Phi-3-Vision layout plus phivision's model code and its auto_map: it loads with phivision, with
    plain transformers (trust_remote_code=True, phivision not needed) and with vLLM (see docs/serving.md).
    """
    typer.echo(f"wrote {api.export(**values)}")


# ----------------------------------------------------------------------------------------------- demo


@command(api.demo)
def demo(values: dict[str, Any]) -> None:
    """The main job: synthetic catalog -> tiny Phi-3-Vision -> evaluate -> fine-tune -> evaluate -> report.

    Finishes in a few minutes on 2 CPU cores and writes OUT/metrics.json ({"before", "after", "baseline"})
    and OUT/report.html. Rerunning reuses what is already done.
    """
    api.demo(**values)


# ------------------------------------------------------------------------------------------ the error net

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
        command_path = err.ctx.command_path if err.ctx is not None else "phivision"
        _fail(f"{err.format_message()} (see '{command_path} --help')", code=err.exit_code)
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
