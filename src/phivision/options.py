"""Option groups: every option of phivision declared once, in a dataclass field, and everything else made from it.

A group is a dataclass deriving from :class:`Options` whose fields come from :func:`option` (type from the
annotation, default, help, and where it has one a range ``check`` such as ``">= 1"`` or ``"in [0, 1)"``,
``choices``, or a ``rule`` for what a range cannot say) or are other groups (:func:`group`). From that one
declaration come:

* the Python API: :func:`verb` gives a function the group's fields as keyword arguments, with their defaults
  (``inspect.signature(phivision.prepare)`` shows them), and hands the function one validated group;
* the command line: ``phivision.cli`` makes a typer flag of every field (help, default, range or choices);
* config files: :class:`phivision.train.TrainConfig` is a group; its nested groups are the YAML sections;
* the one-line error for a bad value (:meth:`Options.validate`): ``--max-new-tokens 0: must be at least 1`` for
  a flag, ``config key 'optim.lr': must be > 0, got 0.0`` for a config key, from the same checks;
* the docs (:mod:`phivision.reference` writes ``docs/cli.md`` and ``docs/config.md`` from them).

Only the standard library is imported here: ``phivision --help`` builds every flag from these declarations.
(pydantic would check types and ranges too, but declaring the groups as pydantic models costs more than the
whole ``--help`` budget; see README, "Project layout".)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from phivision.errors import PhivisionError

REQUIRED: Any = dataclasses.MISSING  # the default of an option that must be given


def option(
    default: Any = REQUIRED,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    check: str | None = None,
    choices: Sequence[str] | None = None,
    rule: Callable[[Any], Any] | None = None,
    what: str | None = None,
    positional: bool = False,
    argument: bool = False,
    flags: Sequence[str] | None = None,
    cli: bool = True,
    api: bool = True,
    cli_required: bool | None = None,
) -> Any:
    """One option: a dataclass field carrying everything the CLI, the API, configs, errors and docs need.

    Args:
        default: the default (:data:`REQUIRED`: must be given); ``factory`` instead for a mutable default.
        help: one sentence for ``--help`` and the docs.
        check: the allowed range, ``">= 1"``, ``"> 0"``, ``"in [0, 1)"``, ``"in [1, 65535]"`` (list items each).
        choices: the allowed values.
        rule: ``rule(value)`` raises ``ValueError(problem)`` for a value no range can describe (a size such as
            ``4GB``, comma-separated numbers); its problem becomes the one-line error.
        what: the noun of a range error: ``--n 0: must be a whole number of products, at least 1``.
        positional: a positional parameter of the Python function (else keyword-only).
        argument: a positional argument on the command line (else a ``--flag``).
        flags: the command line's names, e.g. ``("--decimal-comma/--decimal-point",)``.
        cli: a command-line flag (False: Python only, e.g. an address policy object).
        api: a Python parameter (False: the command line only, e.g. ``--print-config``).
        cli_required: required on the command line although the Python default says otherwise.
    """
    spec: dict[str, Any] = {"help": help}
    for key, value in (
        ("check", check),
        ("choices", tuple(choices) if choices is not None else None),
        ("rule", rule),
        ("what", what),
        ("flags", tuple(flags) if flags else None),
        ("cli_required", cli_required),
    ):
        if value is not None:
            spec[key] = value
    for key, value in (("positional", positional), ("argument", argument)):
        if value:
            spec[key] = True
    for key, value in (("cli", cli), ("api", api)):
        if not value:
            spec[key] = False
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=spec)
    return dataclasses.field(default=default, metadata=spec)


def group(cls: type, help: str = "") -> Any:
    """A nested group (a config section, or a group of flags shared by several verbs)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "group": True})


def field_default(f: dataclasses.Field) -> Any:
    """A field's default (made by its factory where it has one), or :data:`REQUIRED`."""
    return f.default_factory() if f.default is REQUIRED and f.default_factory is not REQUIRED else f.default


def with_default(cls: type, name: str, default: Any) -> Any:
    """Option ``name`` of group ``cls`` with another default (a subclass's own default; help and checks kept)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=f.metadata)


# ------------------------------------------------------------------------------------------- values


def plain(value: object) -> object:
    """A value as a plain Python value for messages and JSON: ``np.float64(-3.0)`` -> ``-3.0``."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (TypeError, ValueError):
            return value
    return value


def shown(value: object) -> str:
    """A value as the user wrote it: ``0``, ``-1.0``, ``'dev'``, ``'0.8,0.1,0.1'`` (never a numpy repr)."""
    value = plain(value)
    if isinstance(value, (list, tuple)):
        return repr(",".join(str(plain(v)) for v in value))
    if isinstance(value, (str, os.PathLike)):
        return repr(os.fspath(value))
    if isinstance(value, float):
        return repr(float(value))
    return str(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclasses.dataclass(frozen=True)
class Check:
    """A range written as ``>= 1``, ``> 0``, ``<= 32``, ``in [0, 1)`` or ``in [1, 65535]``."""

    text: str
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False

    @classmethod
    @functools.cache
    def parse(cls, text: str) -> Check:
        if match := re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", text.strip()):
            op, bound = match.group(1), float(match.group(2))
            if op.startswith(">"):
                return cls(text, low=bound, low_open=op == ">")
            return cls(text, high=bound, high_open=op == "<")
        if match := re.fullmatch(r"in ([\[(])\s*(\S+),\s*(\S+)\s*([\])])", text.strip()):
            return cls(
                text,
                low=float(match.group(2)),
                low_open=match.group(1) == "(",
                high=float(match.group(3)),
                high_open=match.group(4) == ")",
            )
        raise ValueError(f"unknown check {text!r}")

    def _above_low(self, value: float) -> bool:
        return self.low is None or (value > self.low if self.low_open else value >= self.low)

    def _below_high(self, value: float) -> bool:
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def holds(self, value: float) -> bool:
        return self._above_low(value) and self._below_high(value)

    def words(self, value: float | None = None) -> str:
        """The bound ``value`` breaks, in words (``at least 1``), or the whole range when ``value`` is None."""
        low = high = None
        if self.low is not None:
            low = ("greater than " if self.low_open else "at least ") + _number(self.low)
        if self.high is not None:
            high = ("less than " if self.high_open else "at most ") + _number(self.high)
        if value is not None:
            return (low if not self._above_low(value) else high) or ""
        if low and high and not (self.low_open or self.high_open):
            return f"{_number(self.low)} to {_number(self.high)}"
        return ", ".join(part for part in (low, high) if part)


# ------------------------------------------------------------------------------------------- errors


class OptionError(PhivisionError):
    """A bad value of a flag or keyword argument: ``--max-new-tokens 0: must be at least 1``."""

    def __init__(self, flag: str, value: object, problem: str) -> None:
        self.flag = flag
        super().__init__(f"{flag} {shown(value)}: {problem}")


class ConfigError(PhivisionError):
    """A bad config key or value: ``config key 'optim.lr': must be > 0, got -1.0``; ``key`` is the dotted key,
    which :func:`phivision.train.config.load_config` uses to point at the YAML line that set it."""

    def __init__(self, key: str, problem: str, unknown: bool = False):
        self.key = key
        super().__init__(
            f"unknown config key '{key}' ({problem})" if unknown else f"config key '{key}': {problem}"
        )


def flag_name(name: str, spec: dict[str, Any] | None = None) -> str:
    """``max_new_tokens`` -> ``--max-new-tokens`` (or the first of the option's own ``flags``)."""
    if spec and spec.get("flags"):
        return spec["flags"][0].split("/")[0]
    return "--" + name.replace("_", "-")


_NOUNS = {int: "a whole number", float: "a number", bool: "true or false", str: "text", Path: "a path"}


class TypeMismatch(Exception):
    """A value of the wrong type (or an empty path): reported by the caller under the flag or key."""

    def __init__(self, tp: Any, empty: bool = False) -> None:
        super().__init__()
        self.tp, self.empty = tp, empty


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a problem is reported: under a flag (``--batch-size 0: ...``) or a config key (``config key ...``)."""

    config: bool = False

    def mismatch(self, key: str, value: Any, err: TypeMismatch) -> PhivisionError:
        if err.empty:
            return self.problem(key, value, "empty path")
        if self.config:
            return ConfigError(key, f"expected {_type_name(err.tp)}, got {value!r}")
        noun = _NOUNS.get(err.tp) or ("a list" if typing.get_origin(err.tp) in (list, tuple) else None)
        return self.problem(key, value, f"expected {noun or _type_name(err.tp)}")

    def problem(
        self, key: str, value: Any, problem: str, spec: dict[str, Any] | None = None
    ) -> PhivisionError:
        return ConfigError(key, problem) if self.config else OptionError(flag_name(key, spec), value, problem)

    def value_error(self, key: str, value: Any, kind: str, spec: dict[str, Any]) -> PhivisionError:
        """The message for a value of the right type that breaks its option's declaration."""
        if kind == "finite":
            text = (
                f"must be a finite number, got {shown(value)}" if self.config else "expected a finite number"
            )
        elif kind == "choice":
            choices = ", ".join(spec["choices"])
            text = f"{value!r} is not one of {choices}" if self.config else f"expected one of {choices}"
        elif kind == "empty":
            text = "empty name" if self.config else "must not be empty"
        elif self.config:
            text = f"must be {spec['check']}, got {shown(value)}"
        else:
            what = f"{spec['what']}, " if spec.get("what") else ""
            text = f"must be {what}{Check.parse(spec['check']).words(value)}"
        return self.problem(key, value, text, spec)


FLAGS = Naming()
CONFIG = Naming(config=True)


# -------------------------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, text_lists: bool = False) -> Any:
    """``value`` as type ``tp``, converted where that is safe (numpy scalars, integral floats for ints, numbers
    for text, text for paths); raises :class:`TypeMismatch`. ``text_lists``: ``"a,b"`` is a list (config text)."""
    value = plain(value)
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return coerce(value, arg, text_lists)
                except TypeMismatch as err:
                    if err.empty:
                        raise
        raise TypeMismatch(tp)
    if origin in (list, tuple) or (origin is not None and origin.__name__ == "Sequence"):
        (item, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, os.PathLike)):  # one value where a list is expected
            value = [v.strip() for v in value.split(",") if v.strip()] if text_lists else [value]
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch(tp)
        items = [coerce(v, item, text_lists) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # a model given as a path: its text
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Path:
        if isinstance(value, (str, os.PathLike)):
            if os.fspath(value) == "":
                raise TypeMismatch(tp, empty=True)
            return Path(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeMismatch(tp)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a group's fields."""
    return typing.get_type_hints(cls)


def is_group(tp: Any) -> bool:
    """A nested group of options (a dataclass of any other kind, e.g. an address policy, is one value)."""
    return isinstance(tp, type) and issubclass(tp, Options)


def walk_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(dotted key, value, field metadata)`` for every leaf field of a group, in order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Options):
            yield from walk_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, dict(f.metadata)


def check_value(key: str, value: Any, spec: dict[str, Any], naming: Naming = FLAGS) -> None:
    """Finite numbers, an allowed choice, a value within its ``check`` (list items each) and its ``rule``;
    else the error of ``naming``, naming the flag or the key."""
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        name = f"{key}[{i}]" if isinstance(value, list) and naming.config else key
        if isinstance(item, float) and not math.isfinite(item):
            raise naming.value_error(name, item, "finite", spec)
        if "choices" in spec and item not in spec["choices"]:
            raise naming.value_error(name, item, "choice", spec)
        if "check" in spec and isinstance(item, (int, float)) and not Check.parse(spec["check"]).holds(item):
            raise naming.value_error(name, item, "range", spec)
        if isinstance(item, str) and isinstance(value, list) and not item.strip():
            raise naming.value_error(name, item, "empty", spec)
    if "rule" in spec:
        try:
            spec["rule"](value)
        except ValueError as err:
            raise naming.problem(key, value, str(err), spec) from None


def check_option(cls: type, name: str, value: Any, naming: Naming = FLAGS) -> Any:
    """One option's value checked (and converted) as :meth:`Options.validate` checks it, for library code that
    computes a value the user could also have given (e.g. a sample size taken from another dataset)."""
    spec = next(dict(f.metadata) for f in dataclasses.fields(cls) if f.name == name)
    try:
        converted = coerce(value, hints(cls)[name], text_lists=naming.config)
    except TypeMismatch as err:
        raise naming.mismatch(name, value, err) from None
    check_value(name, converted, spec, naming)
    return converted


class Options:
    """The base of every group: :meth:`validate` converts and checks every field (nested groups too) and runs
    each group's :meth:`check` for what involves several fields."""

    def validate(self, naming: Naming = FLAGS, prefix: str = "") -> Options:
        """Convert every value to its declared type and check it; raises a one-line error naming the flag (or
        the config key, with ``naming=CONFIG``). Returns self."""
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), hints(type(self))[f.name]
            key = f"{prefix}{f.name}" if naming.config else f.name
            if isinstance(value, Options):
                value.validate(naming, f"{key}.")
                continue
            try:
                value = coerce(value, tp, text_lists=naming.config)
            except TypeMismatch as err:
                raise naming.mismatch(key, getattr(self, f.name), err) from None
            check_value(key, value, dict(f.metadata), naming)
            setattr(self, f.name, value)
        self.check()
        return self

    def check(self) -> None:
        """Rules across several fields (a subclass's own); raise PhivisionError."""


# ------------------------------------------------------------------------------- the Python API


def leaves(cls: type) -> Iterator[tuple[dataclasses.Field, Any]]:
    """Every option of a group, nested groups flattened, with its resolved type."""
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        if is_group(tp):
            yield from leaves(tp)
        else:
            yield f, tp


def build(cls: type, values: dict[str, Any]) -> Any:
    """A group from flat ``name -> value`` (missing names keep their defaults); nested groups take their own."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        if is_group(tp):
            kwargs[f.name] = build(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def signature(cls: type, returns: Any = inspect.Signature.empty) -> inspect.Signature:
    """The Python signature of a verb: positional options first, then every other one keyword-only."""
    positional, keywords = [], []
    for f, _ in leaves(cls):
        if f.metadata.get("api", True) is False:
            continue
        default = field_default(f)
        default = inspect.Parameter.empty if default is REQUIRED else default
        kind = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if f.metadata.get("positional")
            else inspect.Parameter.KEYWORD_ONLY
        )
        (positional if f.metadata.get("positional") else keywords).append(
            inspect.Parameter(f.name, kind, default=default, annotation=f.type)
        )
    return inspect.Signature(positional + keywords, return_annotation=returns)


def verb(cls: type) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """Make ``function(options: cls)`` a function of the group's options by name: its signature shows every
    option with its default; a call builds the group, validates it (one-line errors naming the flag) and hands it
    to ``function``. ``__options__`` is the group (the CLI makes its flags from it)."""

    def wrap(function: Callable[[Any], Any]) -> Callable[..., Any]:
        shape = signature(cls, inspect.signature(function).return_annotation)

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return function(build(cls, shape.bind(*args, **kwargs).arguments).validate())

        call.__signature__ = shape  # type: ignore[attr-defined]
        call.__options__ = cls  # type: ignore[attr-defined]
        return call

    return wrap


# ------------------------------------------------------------------------------------------- docs


def constraint(spec: dict[str, Any]) -> str:
    """What a value must be, in words (``at least 1``, ``one of: train, val, test``), or ``""``."""
    if "choices" in spec:
        return "one of: " + ", ".join(spec["choices"])
    if "check" in spec:
        return Check.parse(spec["check"]).words()
    return ""
