"""phivision: fine-tune Phi-3-Vision to read product photos.

One import gives the whole API, one function per CLI verb (:mod:`phivision.api`)::

    from phivision import sample, prepare, inspect, tiny, train, evaluate, report, load_model, predict, serve
    from phivision import export, demo

Importing the package is light: no torch, transformers or pandas load until a function is called. The native
Phi-3-Vision classes register with transformers' Auto* classes when :mod:`phivision.model` is first imported.

Five names are both an API function and a submodule: ``phivision.train``, ``phivision.evaluate``,
``phivision.serve`` (subpackages), ``phivision.demo`` and ``phivision.tiny``. The attribute is always the function;
it also leads to the submodule's contents, so ``import phivision.train.loop as loop``, ``from phivision.train.loop import train``
and ``mock.patch("phivision.train.loop.train")`` keep working (see :class:`VerbAndPackage`).
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

from phivision import api
from phivision.api import (
    demo,
    evaluate,
    export,
    inspect,
    load_model,
    predict,
    prepare,
    report,
    sample,
    serve,
    tiny,
    train,
)
from phivision.errors import PhivisionError
from phivision.version import __version__


class VerbAndPackage:
    """An API function that shares its name with a submodule (``phivision.train``, ``phivision.demo``...).

    Calling it calls the function (its signature and docstring are the function's, via ``__wrapped__``); any
    other public attribute comes from the subpackage, imported on first use. So ``phivision.train(...)`` trains,
    and ``phivision.train.loop``, ``phivision.train.TrainConfig`` and ``import phivision.train.loop as loop``
    reach the package as usual.
    """

    def __init__(self, function: Callable[..., Any], package: str) -> None:
        functools.update_wrapper(self, function)
        self._package = package

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # protocol probes must not import torch
            raise AttributeError(name)
        return getattr(importlib.import_module(self._package), name)

    def __dir__(self) -> list[str]:
        package = sys.modules.get(self._package)
        return sorted(set(super().__dir__()) | set(dir(package) if package else ()))

    def __repr__(self) -> str:
        return f"<function phivision.{self.__name__} (and package {self._package})>"


train = VerbAndPackage(train, "phivision.train")  # noqa: F811
evaluate = VerbAndPackage(evaluate, "phivision.evaluate")  # noqa: F811
serve = VerbAndPackage(serve, "phivision.serve")  # noqa: F811
demo = VerbAndPackage(demo, "phivision.demo")  # noqa: F811
tiny = VerbAndPackage(tiny, "phivision.tiny")  # noqa: F811
VERB_PACKAGES = {"train": train, "evaluate": evaluate, "serve": serve, "demo": demo, "tiny": tiny}


class _PhivisionModule(types.ModuleType):
    """The top-level package's module type: importing ``phivision.train`` (the subpackage) does
    ``setattr(phivision, "train", <module>)``, which would replace the API function; this keeps the function.
    A test checks that every API function whose name is also a submodule is in :data:`VERB_PACKAGES`."""

    def __setattr__(self, name: str, value: Any) -> None:
        verb = VERB_PACKAGES.get(name)
        if verb is not None and isinstance(value, types.ModuleType) and value.__name__ == verb._package:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PhivisionModule


__all__ = [
    "PhivisionError",
    "__version__",
    "api",
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
