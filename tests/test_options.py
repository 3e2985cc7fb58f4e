"""One declaration per option: a field added to one group of phivision/args.py is a CLI flag with its help and
range, a keyword of the Python function with its default, a training config key, a row of the generated docs and
a one-line error for a bad value, with nothing else written. And the generated docs/cli.md is current."""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import phivision
from phivision.errors import PhivisionError
from phivision.options import CONFIG, FLAGS, Check, OptionError, Options, option

SRC = Path(phivision.__file__).resolve().parent
DOCS = Path(__file__).resolve().parents[1] / "docs"
NEW_OPTION = '    throwaway_knob: int = option(3, "A knob added by the one-place test.", check=">= 1")\n'


def test_a_new_option_is_written_in_one_place(tmp_path):
    copy = tmp_path / "phivision"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    args = (copy / "args.py").read_text(encoding="utf-8")
    anchor = '    constrain: bool = option(True, CONSTRAIN, flags=("--constrain/--no-constrain",))\n'
    head, tail = args.split("class Generation(Options):", 1)
    changed = head + "class Generation(Options):" + tail.replace(anchor, anchor + NEW_OPTION, 1)
    (copy / "args.py").write_text(changed, encoding="utf-8")
    diff = [
        line
        for line in difflib.unified_diff(args.splitlines(), changed.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert diff == ["+" + NEW_OPTION.rstrip("\n")]  # the one line, in one file

    code = textwrap.dedent(
        """
        import inspect, subprocess, sys
        import phivision
        from phivision.cli import main
        from phivision.errors import PhivisionError
        from phivision.reference import cli_reference, config_reference
        from phivision.train.config import load_config

        assert phivision.__file__.startswith(sys.argv[1]), phivision.__file__
        for verb in ("evaluate", "predict"):  # the CLI: a flag with its help, range and default
            try:
                main([verb, "--help"])
            except SystemExit:
                pass
        parameter = inspect.signature(phivision.evaluate).parameters["throwaway_knob"]  # the API
        assert parameter.default == 3 and parameter.kind is inspect.Parameter.KEYWORD_ONLY
        assert "throwaway_knob" in inspect.signature(phivision.predict).parameters
        assert load_config(None, ["eval.throwaway_knob=5"]).eval.throwaway_knob == 5  # a config key
        assert "`--throwaway-knob`" in cli_reference() and "`eval.throwaway_knob`" in config_reference()
        for call, message in [
            (lambda: phivision.evaluate("m", "d", throwaway_knob=0), "--throwaway-knob 0: must be at least 1"),
            (lambda: load_config(None, ["eval.throwaway_knob=0"]), "config key 'eval.throwaway_knob': must be >= 1"),
        ]:
            try:
                call()
            except PhivisionError as err:
                assert str(err).startswith(message), err
            else:
                raise AssertionError(message)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(copy)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("--throwaway-knob <int>") == 2, done.stdout
    assert "A knob added by the one-place test. [at least 1] [default: 3]" in " ".join(done.stdout.split())
    assert done.stdout.strip().endswith("ok")


def test_docs_cli_md_is_up_to_date():
    from phivision.reference import cli_reference

    expected = cli_reference()
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == expected, (
        "docs/cli.md is stale: regenerate it with `python scripts/docs.py`"
    )


# ------------------------------------------------------------------------------------ the one checker


def test_checks_read_as_words_and_as_written():
    assert Check.parse(">= 1").words(0) == "at least 1" and Check.parse("> 0").words(-1) == "greater than 0"
    assert Check.parse("in [1, 65535]").words() == "1 to 65535"
    assert Check.parse("in [1, 65535]").words(99999) == "at most 65535"
    assert Check.parse("in [0, 1)").words() == "at least 0, less than 1"
    assert Check.parse("in [0, 1)").holds(0.0) and not Check.parse("in [0, 1)").holds(1.0)
    with pytest.raises(ValueError, match="unknown check"):
        Check.parse("between 1 and 2")


def test_one_checker_two_ways_of_naming():
    from dataclasses import dataclass

    @dataclass
    class Knobs(Options):
        rate: float = option(0.5, "A rate.", check="in [0, 1)")
        names: list[str] = option(help="Names.", factory=list)
        kind: str = option("a", "A kind.", choices=("a", "b"))

    for knobs, flag_message, config_message in [
        (Knobs(rate=1.5), "--rate 1.5: must be less than 1", "config key 'rate': must be in [0, 1), got 1.5"),
        (
            Knobs(rate=float("nan")),
            "--rate nan: expected a finite number",
            "must be a finite number, got nan",
        ),
        (Knobs(kind="c"), "--kind 'c': expected one of a, b", "config key 'kind': 'c' is not one of a, b"),
        (Knobs(rate="x"), "--rate 'x': expected a number", "config key 'rate': expected float, got 'x'"),
        (Knobs(names=["a", " "]), "--names ' ': must not be empty", "config key 'names[1]': empty name"),
    ]:
        with pytest.raises(OptionError) as flag_error:
            knobs.validate(FLAGS)
        with pytest.raises(PhivisionError) as config_error:
            knobs.validate(CONFIG)
        assert str(flag_error.value).startswith(flag_message), str(flag_error.value)
        assert config_message in str(config_error.value), str(config_error.value)
