"""`phivision demo`: the wiring on a small catalog (files, metrics.json, rerun reuse, exit codes), then the default
demo as users run it against the quality bar of its issue (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from phivision.data.layout import load_catalog
from phivision.demo import run_demo
from phivision.evaluate.metrics import HEADLINE

QUICK = ["schedule.max_steps=3", "data.batch_size=4", "eval.batch_size=16", "eval.max_new_tokens=24"]


def test_demo_writes_metrics_report_and_reuses_a_finished_run(tmp_path, capsys):
    out = tmp_path / "demo"
    metrics = run_demo(out, n=60, seed=3, overrides=QUICK, progress=False)

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(on_disk) == {"before", "after", "baseline"}
    names = {name for name, _, _ in HEADLINE}
    test_rows = int((load_catalog(out / "data")["split"] == "test").sum())
    for stage in ("before", "after", "baseline"):
        assert names <= set(on_disk[stage]), stage
        assert on_disk[stage]["n"] == test_rows > 0
    assert on_disk["baseline"]["parse_rate"] == 1.0  # the baseline always answers in full
    assert on_disk["before"]["parse_rate"] < 0.5  # a random model does not speak the format
    for name in ("report.html", "run/config.yaml", "run/model/config.json", "data/catalog.parquet"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "before" in html and "after" in html
    printed = capsys.readouterr().out
    assert "category accuracy" in printed and "price MAPE" in printed

    state = json.loads((out / "run" / "trainer_state.json").read_text())
    again = run_demo(out, n=60, seed=3, overrides=QUICK, progress=False)
    assert again == metrics  # nothing retrained: same weights, same greedy answers
    assert json.loads((out / "run" / "trainer_state.json").read_text()) == state
    assert "sampling" not in capsys.readouterr().out


def test_demo_cli_exit_codes(tmp_path):
    out = tmp_path / "cli-demo"
    cmd = [sys.executable, "-m", "phivision.cli", "demo", "--out", str(out), "--n", "60", *QUICK]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["after"]["n"] > 0

    bad = subprocess.run([*cmd[:-4], "schedule.no_such_key=1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "no_such_key" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_the_default_demo_meets_the_quality_bar(tmp_path):
    """The main job as users run it (600 products, packaged recipe): the bar of the issue, on the test split."""
    metrics = run_demo(tmp_path / "demo", progress=False)
    after, baseline = metrics["after"], metrics["baseline"]
    assert after["parse_rate"] >= 0.95
    assert after["category_accuracy"] >= 0.8
    assert after["price_mape"] <= 0.5 * baseline["price_mape"]
    assert metrics["before"]["category_accuracy"] < 0.5  # the gain comes from fine-tuning
