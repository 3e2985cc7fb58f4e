"""``docs/config.md`` and ``docs/cli.md``, generated from the option declarations (:mod:`phivision.args`,
:class:`phivision.train.config.TrainConfig`): regenerate with ``python scripts/docs.py``; a test fails when a file
is stale, so the documentation cannot drift from the flags, keywords and keys it describes."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import typer

from phivision import api
from phivision.cli import app
from phivision.evaluate.metrics import generation_metric_names
from phivision.options import (
    REQUIRED,
    constraint,
    field_default,
    flag_name,
    hints,
    is_group,
    leaves,
)
from phivision.train.config import TrainConfig


def type_label(tp: Any) -> str:
    """A type as the docs show it: ``int``, ``list[str]``, ``float | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_label(a) for a in typing.get_args(tp))
    if origin is not None:
        return (
            f"{getattr(origin, '__name__', origin)}[{', '.join(type_label(a) for a in typing.get_args(tp))}]"
        )
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp).replace("typing.", ""))


def default_label(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _meaning(spec: dict[str, Any], config: bool) -> str:
    text = spec.get("help", "")
    if config and "choices" in spec:
        text += " One of " + ", ".join(f"`{c}`" for c in spec["choices"]) + "."
    elif config and "check" in spec:
        text += f" Must be {spec['check']}."
    elif constraint(spec):
        text += f" ({constraint(spec)})"
    return _cell(text)


# ---------------------------------------------------------------------------------------- config.md


def config_reference() -> str:
    """``docs/config.md``: every key of the training config with its type, default and meaning."""
    out = [
        "# Training config reference",
        "",
        "<!-- Generated from the config classes (src/phivision/train/config.py) by `python scripts/docs.py`; do not edit. -->",
        "",
        "Every key of the training YAML (`phivision train --config FILE`), also settable as a dotted override",
        "(`phivision train ... optim.lr=1e-4`). `phivision train ... --print-config` prints the resolved config",
        "(defaults, then the file, then `--data/--model/--out`, then overrides). Unknown keys, wrong types and",
        "values outside the ranges below stop with one `error:` line naming the key before anything loads.",
        "",
    ]
    top = hints(TrainConfig)
    sections: list[tuple[str, Any]] = [("", TrainConfig)]
    sections += [
        (f"{f.name}.", top[f.name]) for f in dataclasses.fields(TrainConfig) if is_group(top[f.name])
    ]
    for prefix, cls in sections:
        out += [f"## `{prefix.rstrip('.')}`" if prefix else "## Top level", ""]
        if prefix:
            out += [" ".join((cls.__doc__ or "").split()).replace("``", "`"), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if is_group(hints(cls)[f.name]):
                continue
            spec = dict(f.metadata)
            if f"{prefix}{f.name}" == "eval.metric":  # the metrics evaluation really reports, listed live
                names = ", ".join(f"`{n}`" for n in ["val_loss", *generation_metric_names()])
                spec["help"] += (
                    f" One of {names}, or `category<k>_accuracy` for each `category<k>_code` column."
                )
            out.append(
                f"| `{prefix}{f.name}` | {_cell(type_label(hints(cls)[f.name]))} | "
                f"{default_label(field_default(f))} | {_meaning(spec, config=True)} |"
            )
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- cli.md


def _verb_table(function: Any, help_text: str, name: str, command: bool) -> list[str]:
    signature = f"phivision {name}" if command else f"phivision.{name}()"
    out = [f"## `{signature}`", "", help_text.strip().split("\n\n")[0].replace("\n", " "), ""]
    out += ["| flag | Python | type | default | meaning |", "|---|---|---|---|---|"]
    for f, tp in leaves(function.__options__):
        spec = dict(f.metadata)
        cli = spec.get("cli", True) and command
        flag = (
            (
                "`"
                + (f.name.upper() if spec.get("argument") else (spec.get("flags") or [flag_name(f.name)])[0])
                + "`"
            )
            if cli
            else ""
        )
        python = f"`{f.name}`" if spec.get("api", True) else ""
        default = default_label(field_default(f))
        out.append(
            f"| {flag} | {python} | {_cell(type_label(tp))} | {default} | {_meaning(spec, config=False)} |"
        )
    return [*out, ""]


def cli_reference() -> str:
    """``docs/cli.md``: every verb's flags and Python keywords with type, default, range and meaning."""
    commands = typer.main.get_command(app).commands
    out = [
        "# Command-line and Python API reference",
        "",
        "<!-- Generated from the option declarations (src/phivision/args.py) by `python scripts/docs.py`; do not edit. -->",
        "",
        "Every verb is a command (`phivision VERB --help`) and a Python function (`from phivision import VERB`)",
        "with the same options: the flag `--max-new-tokens` is the keyword `max_new_tokens`, with the same default",
        "and the same check (a bad value stops with one `error:` line naming the flag, before anything loads).",
        "Positional Python parameters are marked in each function's signature (`inspect.signature(phivision.VERB)`);",
        "a column left empty is an option only that side has.",
        "",
    ]
    for name, command in commands.items():  # in the order cli.py registers them: the path through the tool
        out += _verb_table(getattr(api, name), command.help or "", name, command=True)
    out += _verb_table(api.load_model, api.load_model.__doc__ or "", "load_model", command=False)
    return "\n".join(out)


DOCS = {"config.md": config_reference, "cli.md": cli_reference}
