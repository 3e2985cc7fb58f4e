"""``docs/config.md``: every training config key with its type, default and meaning, generated from the config
classes' field metadata (regenerate with ``python scripts/config_docs.py``; a test fails when it is stale)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from phivision.train.config import TrainConfig, generation_metric_names


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _type_label(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{_type_label(typing.get_args(tp)[0])}]"
    return _type_name(tp)


def _default_label(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value!r}`"


def _meaning(spec: dict[str, Any]) -> str:
    text = spec.get("help", "")
    if "choices" in spec:
        text += " One of " + ", ".join(f"`{c}`" for c in spec["choices"]) + "."
    if "check" in spec:
        text += f" Must be {spec['check']}."
    return text.replace("|", "\\|")


def config_reference() -> str:
    """``docs/config.md``: every key with its type, default and meaning, from the config classes."""
    out = [
        "# Training config reference",
        "",
        "<!-- Generated from the config classes (src/phivision/train/config.py) by `python scripts/config_docs.py`; do not edit. -->",
        "",
        "Every key of the training YAML (`phivision train --config FILE`), also settable as a dotted override",
        "(`phivision train ... optim.lr=1e-4`). `phivision train ... --print-config` prints the resolved config",
        "(defaults, then the file, then `--data/--model/--out`, then overrides). Unknown keys, wrong types and",
        "values outside the ranges below stop with one `error:` line naming the key before anything loads.",
        "",
    ]
    top = typing.get_type_hints(TrainConfig)
    sections: list[tuple[str, Any]] = [("", TrainConfig)]
    sections += [
        (f"{f.name}.", top[f.name])
        for f in dataclasses.fields(TrainConfig)
        if dataclasses.is_dataclass(top[f.name])
    ]
    for prefix, cls in sections:
        out += [f"## `{prefix.rstrip('.')}`" if prefix else "## Top level", ""]
        if prefix:
            out += [(cls.__doc__ or "").strip().replace("``", "`"), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            value = getattr(defaults, f.name)
            spec = dict(f.metadata)
            if f"{prefix}{f.name}" == "eval.metric":  # the metrics evaluation really reports, listed live
                names = ", ".join(f"`{n}`" for n in ["val_loss", *generation_metric_names()])
                spec["help"] += (
                    f" One of {names}, or `category<k>_accuracy` for each `category<k>_code` column."
                )
            out.append(
                f"| `{prefix}{f.name}` | {_type_label(hints[f.name])} | {_default_label(value)} | {_meaning(spec)} |"
            )
        out.append("")
    return "\n".join(out)
