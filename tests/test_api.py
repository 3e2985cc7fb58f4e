"""The one-import API: every verb is a function of ``phivision`` with the CLI's names and defaults; three of them
share their name with a subpackage and stay the function; each works end to end on the tiny model."""

from __future__ import annotations

import importlib
import inspect as pyinspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer

import phivision
from phivision import api
from phivision.cli import app
from phivision.errors import PhivisionError

VERBS = [
    "sample",
    "prepare",
    "inspect",
    "tiny",
    "train",
    "evaluate",
    "report",
    "load_model",
    "predict",
    "serve",
    "export",
    "demo",
]


def run_python(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_every_verb_is_one_import_away():
    done = run_python(
        """
        from phivision import (sample, prepare, inspect, tiny, train, evaluate, report, load_model, predict,
                               serve, export, demo)
        import sys
        print(all(callable(f) for f in (sample, prepare, inspect, tiny, train, evaluate, report, load_model,
                                        predict, serve, export, demo)))
        print(sorted(m for m in ("torch", "transformers", "pandas", "numpy", "PIL", "fastapi") if m in sys.modules))
        """
    )
    assert done.stdout.split("\n")[:2] == ["True", "[]"]  # importing the functions loads nothing heavy


def test_api_function_is_kept_when_its_subpackage_is_imported():
    """importlib sets ``phivision.train = <module>`` on ``import phivision.train.loop``; the function stays, and
    the usual ways of reaching the subpackage's contents keep working."""
    done = run_python(
        """
        import sys
        import unittest.mock
        import phivision, phivision.api
        import phivision.train.loop
        import phivision.evaluate.metrics as metrics_module
        from phivision.train.loop import TrainResult, train as loop_train
        from phivision.serve.predict import expand_inputs
        import phivision.serve.export

        import phivision.demo
        for name in ("train", "evaluate", "serve", "demo"):
            verb = getattr(phivision, name)
            assert verb.__wrapped__ is getattr(phivision.api, name), name
            assert verb.__name__ == name and verb.__doc__ == getattr(phivision.api, name).__doc__
        from phivision import train, evaluate, serve, demo
        assert train is phivision.train and evaluate is phivision.evaluate and serve is phivision.serve
        assert demo is phivision.demo and phivision.demo.run_demo is sys.modules["phivision.demo"].run_demo
        assert phivision.train.loop is sys.modules["phivision.train.loop"]
        assert phivision.train.loop.train is loop_train and phivision.train.TrainResult is TrainResult
        assert metrics_module is sys.modules["phivision.evaluate.metrics"]
        assert phivision.serve.predict.expand_inputs is expand_inputs
        with unittest.mock.patch("phivision.train.loop.train") as fake:
            assert phivision.train.loop.train is fake and sys.modules["phivision.train.loop"].train is fake
        assert phivision.train.loop.train is loop_train
        with unittest.mock.patch.object(phivision.evaluate.metrics, "summarize") as fake:
            assert metrics_module.summarize is fake
        phivision.train = "replaced"  # an explicit assignment still works (monkeypatch.setattr(phivision, ...))
        assert phivision.train == "replaced"
        print("ok")
        """
    )
    assert done.stdout.strip() == "ok"


def test_every_name_clash_is_guarded():
    """An API function named like a submodule of phivision must be in VERB_PACKAGES, or importing that submodule
    would replace the function."""
    import pkgutil

    submodules = {info.name for info in pkgutil.iter_modules(phivision.__path__)}
    assert submodules & set(api.__all__) == set(phivision.VERB_PACKAGES)


def test_monkeypatch_by_dotted_name_reaches_the_subpackage(monkeypatch):
    import phivision.evaluate.metrics as metrics_module

    monkeypatch.setattr("phivision.evaluate.metrics.summarize", "patched")
    assert metrics_module.summarize == "patched"
    assert callable(phivision.evaluate) and phivision.evaluate.__wrapped__ is api.evaluate


def test_verb_signature_and_help_are_the_functions():
    assert pyinspect.signature(phivision.train) == pyinspect.signature(api.train)
    assert "Fine-tune" in phivision.train.__doc__
    importlib.import_module("phivision.train.loop")
    assert {"train", "evaluate", "serve"} <= set(dir(phivision)) and "loop" in dir(phivision.train)


def _cli_defaults(verb: str) -> dict[str, object]:
    command = typer.main.get_command(app).commands[verb]
    return {param.name: param.default for param in command.params}


# Flags about what the command prints, with no Python counterpart (Python gets the value itself).
CLI_ONLY = {("train", "print_config")}  # phivision.train.config.cli_config(...) is the resolved config


@pytest.mark.parametrize("verb", [v for v in VERBS if v not in ("load_model",)])
def test_cli_flags_are_the_api_parameters_with_the_same_defaults(verb):
    if verb not in typer.main.get_command(app).commands:
        pytest.skip(f"no `phivision {verb}` on this branch")
    parameters = pyinspect.signature(getattr(api, verb)).parameters
    for name, cli_default in _cli_defaults(verb).items():
        if (verb, name) in CLI_ONLY:
            continue
        assert name in parameters, f"`phivision {verb} --{name}` has no parameter in phivision.api.{verb}"
        api_default = parameters[name].default
        if api_default is pyinspect.Parameter.empty:
            continue  # required in Python; the CLI may require it too or give it a default of None
        if isinstance(api_default, (str, Path)) and cli_default is not None:
            api_default, cli_default = str(api_default), str(cli_default)
        assert cli_default == api_default, f"{verb} --{name}: CLI {cli_default!r} != API {api_default!r}"


def _defaults(function) -> dict[str, object]:
    return {
        name: p.default
        for name, p in pyinspect.signature(function).parameters.items()
        if p.default is not pyinspect.Parameter.empty
    }


def _normalized(value: object) -> object:
    """Split ratios are text on the command line ("0.8,0.1,0.1") and a tuple in the data code."""
    if isinstance(value, str) and value.count(",") == 2:
        return tuple(float(part) for part in value.split(","))
    return tuple(value) if isinstance(value, list) else value


def _assert_same(api_function, implementation: dict, renames: dict[str, str] | None = None):
    ours = _defaults(api_function)
    for name, value in implementation.items():
        name = (renames or {}).get(name, name)
        if name in ours:
            mine, theirs = _normalized(ours[name]), _normalized(value)
            assert mine == theirs, f"{api_function.__name__}({name}=...): {mine!r} != {theirs!r}"


def test_api_defaults_agree_with_the_implementations():
    """The API is where users and the CLI read defaults (made from phivision.args, which the verbs' library
    functions take whole); where a function below the verbs keeps keyword defaults of its own, they agree."""
    from phivision.runs import load_model
    from phivision.serve.export import export_run
    from phivision.tiny import write_tiny_checkpoint

    _assert_same(api.tiny, _defaults(write_tiny_checkpoint))
    _assert_same(api.export, _defaults(export_run))
    _assert_same(api.load_model, _defaults(load_model))


@pytest.mark.parametrize(
    ("call", "flag"),
    [
        (lambda tmp: api.sample(tmp / "s", n=0), "--n 0"),
        (lambda tmp: api.tiny(tmp / "t", num_crops=0), "--num-crops 0"),
        (lambda tmp: api.serve(tmp / "nothing", port=99999), "--port 99999"),
        (lambda tmp: api.serve(tmp / "nothing", max_new_tokens=0), "--max-new-tokens 0"),
        (lambda tmp: api.evaluate(tmp / "m", tmp / "d", max_new_tokens=0), "--max-new-tokens 0"),
        (lambda tmp: api.predict(tmp / "i", tmp / "m", batch_size=0), "--batch-size 0"),
        (lambda tmp: api.demo(tmp / "demo", n=0), "--n 0"),
    ],
)
def test_out_of_range_arguments_fail_before_anything_loads(tmp_path, call, flag):
    with pytest.raises(PhivisionError, match=f"^{flag}: must be"):
        call(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------------------ on the tiny model


def test_sample_tiny_evaluate_predict_report(tmp_path, tiny_checkpoint):
    data = phivision.sample(tmp_path / "data", n=36, seed=1)
    assert (data / "catalog.parquet").is_file()
    base = phivision.tiny(tmp_path / "base", seed=1, num_crops=2)
    assert json.loads((base / "preprocessor_config.json").read_text())["num_crops"] == 2

    metrics = phivision.evaluate(tiny_checkpoint, data, tmp_path / "eval", limit=2, max_new_tokens=4)
    assert metrics["n"] == 2 and (tmp_path / "eval" / "predictions.jsonl").is_file()
    assert (
        phivision.report(predictions=tmp_path / "eval" / "predictions.jsonl")
        == tmp_path / "eval" / "report.html"
    )

    loaded = phivision.load_model(tiny_checkpoint, device="cpu")
    images = sorted((data / "images").iterdir())[:2]
    records = phivision.predict(images, loaded, out=tmp_path / "p.jsonl", max_new_tokens=4, progress=False)
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == records


def test_train_and_export(tmp_path, tiny_checkpoint, sample_dataset):
    quick = [
        "method=full",
        "schedule.max_steps=1",
        "data.batch_size=2",
        "eval.gen_samples=0",
        "eval.max_samples=2",
    ]
    result = phivision.train(
        tmp_path / "run", data=sample_dataset, model=str(tiny_checkpoint), overrides=quick
    )
    assert result.steps == 1 and (tmp_path / "run" / "config.yaml").is_file()
    # a TrainConfig works as well as a YAML path; out/data/model/overrides still apply on top of it
    from phivision.train.config import load_config

    config = load_config(None, [*quick, "optim.lr=1e-3"], model=str(tiny_checkpoint), data={"path": "x"})
    again = phivision.train(tmp_path / "run2", data=sample_dataset, config=config, overrides=["seed=5"])
    saved = (tmp_path / "run2" / "config.yaml").read_text()
    assert again.steps == 1 and "lr: 0.001" in saved and "seed: 5" in saved

    exported = phivision.export(tmp_path / "run", tmp_path / "export")
    assert (exported / "config.json").is_file() and (exported / "phivision.json").is_file()


def test_inspect_wraps_the_dataset_inspection(tmp_path, sample_dataset):
    pytest.importorskip("phivision.data.inspection", reason="`phivision inspect` lands with the data branch")
    result = phivision.inspect(sample_dataset, out=tmp_path / "inspect.html", progress=False)
    assert result["rows"] > 0 and (tmp_path / "inspect.html").is_file()
