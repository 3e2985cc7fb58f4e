"""`phivision demo`: the wiring on a small catalog (files, metrics.json, rerun reuse, recomputing what changed,
exit codes), then the default demo as users run it against the quality bar of its issue (about two minutes on
2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import phivision
from phivision.api import demo as run_demo
from phivision.data.layout import load_catalog
from phivision.errors import PhivisionError
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
    assert (
        on_disk["before"]["parse_rate"] == 1.0
    )  # constrained answers: even the random model fills the template
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
    printed = capsys.readouterr().out
    assert "sampling" not in printed and "fine-tuning" not in printed
    for step in ("data", "base", "before", "train", "after"):
        assert f"reusing {step}: same inputs" in printed


def _steps(out):
    return json.loads((out / "demo.json").read_text())["steps"]


def test_demo_recomputes_a_step_whose_inputs_changed_and_everything_after_it(tmp_path, capsys):
    """The README's `phivision demo --seed 1` into a seed-0 folder must not reuse seed 0's data, checkpoint or
    run; a changed training override retrains but keeps the dataset and the tiny checkpoint."""
    out = tmp_path / "demo"
    phivision.demo(out, n=40, seed=0, overrides=QUICK, progress=False)
    seed0 = _steps(out)
    assert seed0["data"]["inputs"] == {"n": 40, "seed": 0, "phivision": phivision.__version__}
    assert seed0["train"]["inputs"]["config"]["schedule"]["max_steps"] == 3
    catalog0 = load_catalog(out / "data")
    weights0 = (out / "base" / "model.safetensors").read_bytes()
    capsys.readouterr()

    phivision.demo(out, n=40, seed=1, overrides=QUICK, progress=False)
    seed1 = _steps(out)
    printed = capsys.readouterr().out
    assert "seed 0 -> 1" in printed and "reusing" not in printed
    assert all(seed1[step]["id"] != seed0[step]["id"] for step in seed0)  # every step computed again
    assert not load_catalog(out / "data")[["title", "full_price"]].equals(catalog0[["title", "full_price"]])
    assert (out / "base" / "model.safetensors").read_bytes() != weights0
    assert "seed: 1" in (out / "run" / "config.yaml").read_text()

    phivision.demo(out, n=40, seed=1, overrides=[*QUICK, "schedule.max_steps=4"], progress=False)
    changed = _steps(out)
    printed = capsys.readouterr().out
    assert "reusing data" in printed and "reusing base" in printed
    assert "schedule.max_steps 3 -> 4" in printed
    assert changed["data"]["id"] == seed1["data"]["id"] and changed["base"]["id"] == seed1["base"]["id"]
    for step in ("train", "after", "before"):  # before lives in the run directory, which training replaces
        assert changed[step]["id"] != seed1[step]["id"], step
    assert json.loads((out / "run" / "trainer_state.json").read_text())["step"] == 4


def test_demo_resumes_an_unfinished_run_and_redoes_a_missing_output(tmp_path, capsys):
    out = tmp_path / "demo"
    run_demo(out, n=40, seed=0, overrides=QUICK, progress=False)
    (out / "run" / "eval" / "before" / "metrics.json").unlink()
    record = json.loads((out / "demo.json").read_text())
    record["steps"]["train"]["done"] = False  # as if the process died during training
    (out / "demo.json").write_text(json.dumps(record))
    capsys.readouterr()
    run_demo(out, n=40, seed=0, overrides=QUICK, progress=False)
    printed = capsys.readouterr().out
    assert "(before: its output is missing or unfinished)" in printed
    assert "resuming the unfinished training run" in printed
    assert "(after: changed: train was recomputed)" in printed
    assert (out / "run" / "eval" / "after" / "metrics.json").is_file()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / "data").mkdir()
    with pytest.raises(PhivisionError, match="not a phivision demo directory.*'thesis.tex'"):
        run_demo(out, n=40, overrides=QUICK, progress=False)
    with pytest.raises(PhivisionError, match="not a phivision demo directory"):
        run_demo(out, n=40, overrides=QUICK, progress=False, fresh=True)
    assert (out / "thesis.tex").read_text() == "precious" and (out / "data").is_dir()


def test_demo_threads_follow_num_threads_then_the_wait_policy():
    import torch

    from phivision.demo import choose_threads

    before = torch.get_num_threads()
    try:
        assert choose_threads(3, None)[0] == 3 and torch.get_num_threads() == 3
        passive = choose_threads(0, "OMP_WAIT_POLICY=PASSIVE")  # threads sleep while waiting: count stays
        assert passive[0] == 3 and "OMP_WAIT_POLICY=PASSIVE" in passive[1]
        threads, reason = choose_threads(0, None)  # spinning threads: one thread never waits
        assert threads == 1 and torch.get_num_threads() == 1 and "num_threads=N" in reason
    finally:
        torch.set_num_threads(before)


def test_demo_cli_exit_codes(tmp_path):
    out = tmp_path / "cli-demo"
    cmd = [sys.executable, "-m", "phivision.cli", "demo", "--out", str(out), "--n", "60", *QUICK]
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    env["OMP_DISPLAY_ENV"] = "TRUE"  # libgomp prints the settings it started with
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["after"]["n"] > 0
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in done.stderr  # set before torch loaded, so OpenMP obeys it
    assert (
        "torch CPU threads: " in done.stdout
        and "waiting OpenMP threads: OMP_WAIT_POLICY=PASSIVE" in done.stdout
    )

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
