"""The HTML report: built from a RUN's eval stages or one predictions file, self-contained, renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_helpers import oracle_answers, write_catalog
from PIL import Image, ImageStat
from typer.testing import CliRunner

import phivision.evaluate.generate as generate_module
from phivision.cli import app
from phivision.errors import PhivisionError
from phivision.evaluate import eval_dir, evaluate
from phivision.evaluate.report import GALLERY_SIZE, load_run, write_report
from phivision.runs import load_model

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    """A RUN with eval/before (poor answers) and eval/after (good answers): 80 products, 40 of them in test."""
    root = tmp_path_factory.mktemp("report")
    data = write_catalog(root / "data", n=80)
    catalog = pd.read_parquet(data / "catalog.parquet")
    loaded = load_model(tiny_checkpoint, device="cpu")
    run = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        for stage, quality in (("before", "poor"), ("after", "good")):
            patch.setattr(generate_module, "generate_answers", oracle_answers(catalog, quality))
            evaluate(loaded, data, out=eval_dir(run, stage), progress=False)
    return run


@pytest.fixture(scope="module")
def report_path(run_dir) -> Path:
    return write_report(run=run_dir)


def test_report_from_run(run_dir, report_path) -> None:
    assert report_path == run_dir / "report.html"
    text = report_path.read_text()
    assert [s.name for s in load_run(run_dir)] == ["before", "after"]
    headline = text[text.index('id="headline"') : text.index("</table>")]
    assert "<th>before</th>" in headline and "<th>after</th>" in headline and "baseline" in headline
    after = json.loads((run_dir / "eval" / "after" / "metrics.json").read_text())
    assert f"{100 * after['price_mape']:.1f}%" in headline
    assert f"{100 * after['baseline']['category_accuracy']:.1f}%" in headline
    assert text.count('src="data:image/png;base64,') == 3  # scatter, histogram, confusion matrix
    assert text.count('src="data:image/jpeg;base64,') == 2 * GALLERY_SIZE  # best and worst thumbnails
    for category in ("Bags", "Scarves", "Coats", "Shirts"):
        assert f"<td>{category}</td>" in text
    assert "I cannot tell." in text  # the worst gallery shows raw unparseable answers


def test_report_is_self_contained(report_path) -> None:
    text = report_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text)
    assert "<script" not in text
    assert "http://" not in text and "https://" not in text
    assert report_path.stat().st_size < 2_000_000


def test_report_from_predictions_file_without_metrics(run_dir, tmp_path) -> None:
    predictions = tmp_path / "predictions.jsonl"
    shutil.copy(run_dir / "eval" / "after" / "predictions.jsonl", predictions)
    out = write_report(predictions=predictions)
    assert out == tmp_path / "report.html"
    text = out.read_text()
    assert "<th>" + tmp_path.name + "</th>" in text
    assert "baseline" not in text[text.index('id="headline"') : text.index("</table>")]  # needs metrics.json


def test_report_user_errors(tmp_path, run_dir) -> None:
    with pytest.raises(PhivisionError, match="no evaluation found"):
        write_report(run=tmp_path)
    with pytest.raises(PhivisionError, match="exactly one"):
        write_report()
    with pytest.raises(PhivisionError, match="exactly one"):
        write_report(run=run_dir, predictions=tmp_path / "p.jsonl")
    bad = tmp_path / "bad" / "predictions.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"truth": {}, "parsed": {}, "errors": {}}\n{not json\n')
    with pytest.raises(PhivisionError, match=r"predictions.jsonl line 2: not JSON"):
        write_report(predictions=bad)
    assert not (bad.parent / "report.html").exists()


def test_report_opens_in_chromium_without_errors(report_path, tmp_path) -> None:
    # Fails (never skips) when the browser is missing: scripts/test.sh installs Debian's chromium.
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} not found: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    problems, requests = [], []
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report_path.as_uri(), wait_until="load")
            loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert len(loaded) == 3 + 2 * GALLERY_SIZE and all(loaded)
    image = Image.open(shot).convert("L")
    assert image.height > 900  # a full page, well past one screen
    assert ImageStat.Stat(image).stddev[0] > 10  # not blank
    assert np.unique(np.asarray(image.resize((256, 256)))).size > 50  # many grey levels: plots and photos


def test_cli_report(run_dir, tmp_path) -> None:
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", "--run", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
