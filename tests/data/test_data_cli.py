"""`phivision sample / prepare / inspect` on the command line: bad flags give one `error:` line and exit 2;
the library functions take every flag by the same name with the same default."""

from __future__ import annotations

import inspect as pyinspect
import json

import pandas as pd
import pytest
import typer
from fault_server import dbq_row, image_bytes

from cli_helpers import run_cli
from phivision import api
from phivision.api import prepare, sample
from phivision.cli import app


@pytest.fixture
def table(tmp_path):
    rows = []
    for i, price in enumerate(["1.290", "2.450", "990"]):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes((80 * i, 30, 30)))
        rows.append(dbq_row(f"P{i}", f"Item {i}", "bags", price, str(tmp_path / f"{i}.jpg")))
    path = tmp_path / "eu.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--n", "0"], "--n 0: must be a whole number of products, at least 1"),
        (["sample", "--n", "-5"], "--n -5: must be a whole number"),
        (
            ["sample", "--split", "0,1,1"],
            "--split '0,1,1': expected three non-negative numbers with train > 0",
        ),
        (["sample", "--like", "missing-dir"], "missing-dir/catalog.parquet: not found"),
        (["prepare", "--download-timeout", "0"], "--download-timeout 0.0: must be greater than 0"),
        (["prepare", "--retries", "-1"], "--retries -1: must be at least 0"),
        (["prepare", "--max-price", "-1"], "--max-price -1.0: must be greater than 0"),
        (["prepare", "--max-bytes", "0"], "--max-bytes 0: must be at least 1"),
        (["prepare", "--limit", "0"], "--limit 0: must be at least 1"),
        (["prepare", "--per-host", "0"], "--per-host 0: must be at least 1"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tmp_path, capsys, table, args, message):
    verb, *rest = args
    where = ["--out", str(tmp_path / "out")]
    if verb == "prepare":
        where += ["--source", str(table), "--no-progress"]
    code, _, err = run_cli(capsys, verb, *where, *rest)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "np." not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_decimal_mark_flags(tmp_path, capsys, table):
    # 1.290 and 2.450 read two ways and no cell settles the column: dropped, with the flags named
    code, out, err = run_cli(
        capsys, "prepare", "--source", str(table), "--out", str(tmp_path / "a"), "--allow-local"
    )
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "prepare_report.json").read_text())
    assert report["dropped_by_reason"] == {"ambiguous_price": 2}
    assert "pass --decimal-comma or --decimal-point" in report["failed"][0]["detail"]
    assert "decimal undecided (undecided)" in out
    (tmp_path / "only.csv").write_text(pd.read_csv(table, dtype=str).head(2).to_csv(index=False))
    code, _, err = run_cli(
        capsys,
        "prepare",
        "--source",
        str(tmp_path / "only.csv"),
        "--out",
        str(tmp_path / "x"),
        "--allow-local",
    )
    assert code == 2 and "every price reads two ways (e.g. row 2: '1.290'); pass --decimal-comma" in err
    code, out, err = run_cli(
        capsys,
        "prepare",
        "--source",
        str(table),
        "--out",
        str(tmp_path / "b"),
        "--allow-local",
        "--decimal-comma",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "prepare_report.json").read_text())
    assert report["prices"][str(table)]["decimal"] == "comma"
    assert report["prices"][str(table)]["decided_by"] == "flag"
    assert sorted(pd.read_parquet(tmp_path / "b" / "catalog.parquet")["full_price"]) == [
        990.0,
        1290.0,
        2450.0,
    ]
    assert "decimal comma (flag)" in out
    code, _, _ = run_cli(
        capsys,
        "prepare",
        "--source",
        str(table),
        "--out",
        str(tmp_path / "c"),
        "--allow-local",
        "--decimal-point",
    )
    assert code == 0
    assert sorted(pd.read_parquet(tmp_path / "c" / "catalog.parquet")["full_price"]) == [1.29, 2.45, 990.0]


@pytest.mark.parametrize("verb", ["sample", "prepare", "inspect"])
def test_library_functions_take_the_declared_group(verb):
    """The CLI flags, the API keywords and the library's input are one declaration (phivision.args): the library
    function takes the validated group, so no default is written twice."""
    import importlib

    module = {"sample": "sample", "prepare": "prepare", "inspect": "inspection"}[verb]
    library = getattr(importlib.import_module(f"phivision.data.{module}"), verb)
    group = getattr(api, verb).__options__
    (first, *_) = pyinspect.signature(library).parameters.values()
    assert first.annotation == group.__name__
    flags = {p.name for p in typer.main.get_command(app).commands[verb].params}
    assert flags <= set(pyinspect.signature(getattr(api, verb)).parameters)


def test_numpy_values_never_leak_into_messages(tmp_path):
    import numpy as np

    from phivision.args import parse_ratios
    from phivision.errors import PhivisionError

    with pytest.raises(PhivisionError) as info:
        parse_ratios((np.float64(-3.0), np.float64(1.0), np.float64(1.0)))
    assert str(info.value) == "--split '-3.0,1.0,1.0': expected three non-negative numbers with train > 0"
    with pytest.raises(PhivisionError) as info:
        sample(tmp_path / "a", n=np.int64(0))
    assert str(info.value) == "--n 0: must be a whole number of products, at least 1"
    with pytest.raises(PhivisionError) as info:
        prepare("x.csv", tmp_path / "b", max_price=np.float64(-3.0))
    assert str(info.value) == "--max-price -3.0: must be greater than 0"
    assert sample(tmp_path / "c", n=np.int64(3)).is_dir()  # a numpy integer is a fine count
