"""`phivision prepare` against a loopback server with faults: exact outcome counts, resumability, bad tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fault_server import FaultServer, bomb_bytes, dbq_row, image_bytes

from cli_helpers import run_cli
from phivision.api import prepare
from phivision.data import load_catalog, load_image
from phivision.data.download import file_stem, url_hash
from phivision.data.prepare import summary
from phivision.errors import PhivisionError


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def fault_rows(server: FaultServer) -> list[dict]:
    server.files["b.png"] = image_bytes((20, 90, 200), fmt="PNG")
    server.files["k.png"] = bomb_bytes()
    u = server.url
    return [
        dbq_row("A1", "Red Tote", "bags", "$1,290.00", u("img/a.jpg")),
        dbq_row("B2", "Blue Tote", "bags", "1290", u("img/b.png")),
        dbq_row("A1-GRN", "Red Tote", "bags", "USD 1290", u("img/a.jpg")),  # a variant sharing the URL
        dbq_row("C3", "Lost Scarf", "scarves", 450, u("404/c.jpg")),
        dbq_row("D4", "Flaky Scarf", "scarves", 460, u("500/d.jpg")),
        dbq_row("E5", "Busy Hat", "hats", 260, u("429/e.jpg")),
        dbq_row("F6", "Slow Hat", "hats", 270, u("slow/f.jpg")),
        dbq_row("G7", "Cut Watch", "watches", 1800, u("truncated/g.jpg")),
        dbq_row("H8", "Short Watch", "watches", 1810, u("short/h.jpg")),
        dbq_row("I9", "Html Shoe", "shoes", 550, u("html/i.jpg")),
        dbq_row("J10", "Empty Shoe", "shoes", 560, u("empty/j.jpg")),
        dbq_row("K11", "Bomb Shirt", "shirts", 320, u("img/k.png")),
        dbq_row("L12", "Moved Shirt", "shirts", "70,000", u("redirect/l.jpg")),
        dbq_row("M13", "No Image Bag", "bags", 900, "N.A."),
        dbq_row("N14", "No Price Bag", "bags", "N.A.", u("img/n.jpg")),
        dbq_row("O15", "Ftp Bag", "bags", 900, "ftp://example.com/o.jpg"),
        dbq_row("P16", "", "bags", 900, u("img/p.jpg")),
    ]


def test_prepare_counts_every_outcome_and_resumes(tmp_path, server, fast_download):
    source = write_csv(tmp_path / "catalog.csv", fault_rows(server))
    out = tmp_path / "ds"
    report = prepare([str(source)], out, **fast_download, progress=False)

    assert report["counts"] == {"rows": 17, "kept": 6, "dropped": 11}
    assert report["dropped_by_reason"] == {
        "http_404": 1,
        "timeout": 1,
        "truncated": 1,
        "incomplete_response": 1,
        "not_an_image": 1,
        "empty": 1,
        "too_many_pixels": 1,
        "missing_image_url": 1,
        "missing_price": 1,
        "unsupported_url": 1,
        "missing_title": 1,
    }
    images = report["images"]
    assert (images["unique_urls"], images["downloaded"], images["reused"], images["failed"]) == (12, 5, 0, 7)
    # one request each, plus one retry for 500, 429, the slow response and the short body; none for 404
    assert (images["requests"], images["retries"]) == (16, 4)
    assert server.counts["/404/c.jpg"] == 1
    assert server.counts["/500/d.jpg"] == 2
    assert server.counts["/slow/f.jpg"] == 2
    assert server.counts["/img/a.jpg"] == 1  # two products, one download
    assert server.counts["/redirect/l.jpg"] == server.counts["/img/l.jpg"] == 1
    first, second = server.times["/429/e.jpg"]
    assert second - first >= 0.9  # Retry-After: 1 was honoured (the backoff alone would be ~0.01 s)

    on_disk = json.loads((out / "prepare_report.json").read_text())
    assert on_disk["counts"] == report["counts"]
    failed = {row["product_code"]: row for row in on_disk["failed"]}
    assert failed["C3"]["url"].endswith("/404/c.jpg") and failed["C3"]["reason"] == "http_404"
    assert failed["M13"] == {
        "source": str(source),
        "row": 15,  # as a spreadsheet shows the CSV: the header is row 1
        "product_code": "M13",
        "url": "N.A.",
        "reason": "missing_image_url",
        "detail": "",
    }

    catalog = load_catalog(out)
    assert sorted(catalog["product_code"]) == ["A1", "A1-GRN", "B2", "D4", "E5", "L12"]
    prices = dict(zip(catalog["product_code"], catalog["full_price"], strict=True))
    assert prices == {"A1": 1290.0, "B2": 1290.0, "A1-GRN": 1290.0, "D4": 460.0, "E5": 260.0, "L12": 70000.0}
    # "70,000" reads two ways; the column's unambiguous cells ($1,290.00, USD 1290.5...) use a decimal point
    assert on_disk["prices"][str(source)]["decimal"] == "point"
    assert on_disk["prices"][str(source)]["ambiguous_read_by_convention"] == 1
    by_code = catalog.set_index("product_code")
    assert by_code.loc["A1", "image_path"] == by_code.loc["A1-GRN", "image_path"]
    assert by_code.loc["A1", "split"] == by_code.loc["A1-GRN", "split"]  # variants sharing a title
    assert by_code.loc["B2", "image_path"].endswith(".png")
    assert set(catalog.columns) >= {"category1_code", "category2_code", "category3_code", "currency_code"}
    for path in catalog["image_path"]:
        assert load_image(out / path).mode == "RGB"
    assert "Prepared 6 of 17 products" in summary(report)

    # rerun: finished images are reused, never fetched again; the failures are tried again
    before = dict(server.counts)
    again = prepare([str(source)], out, **fast_download, progress=False)
    assert (again["images"]["downloaded"], again["images"]["reused"], again["images"]["failed"]) == (0, 5, 7)
    for path in ("/img/a.jpg", "/img/b.png", "/500/d.jpg", "/429/e.jpg", "/redirect/l.jpg"):
        assert server.counts[path] == before[path]
    assert server.counts["/404/c.jpg"] == 2
    pd.testing.assert_frame_equal(load_catalog(out), catalog)


def test_a_corrupted_file_on_disk_is_fetched_again(tmp_path, server, fast_download):
    source = write_csv(tmp_path / "c.csv", [dbq_row("A1", "Red Tote", "bags", 100, server.url("img/a.jpg"))])
    out = tmp_path / "ds"
    prepare([str(source)], out, **fast_download, progress=False)
    image = out / load_catalog(out)["image_path"][0]
    image.write_bytes(image.read_bytes()[:50])  # damaged by something outside phivision
    report = prepare([str(source)], out, **fast_download, progress=False)
    assert (report["images"]["downloaded"], report["images"]["reused"]) == (1, 0)
    assert server.counts["/img/a.jpg"] == 2
    load_image(image)


def test_local_files_need_allow_local(tmp_path, fast_download):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    rows = [
        dbq_row("A", "Red Tote", "bags", 100, str(tmp_path / "a.jpg")),
        dbq_row("B", "Red Hat", "hats", 100, (tmp_path / "a.jpg").as_uri()),
    ]
    source = write_csv(tmp_path / "c.csv", rows)
    with pytest.raises(PhivisionError, match="no product survived"):
        prepare([str(source)], tmp_path / "no", **fast_download, progress=False)
    report = json.loads((tmp_path / "no" / "prepare_report.json").read_text())
    assert report["dropped_by_reason"] == {"unsupported_url": 2}

    report = prepare([str(source)], tmp_path / "yes", allow_local=True, progress=False)
    assert report["counts"]["kept"] == 2 and report["images"]["unique_urls"] == 2


def test_swapped_column_types_and_several_sources_combine(tmp_path):
    """Sibling DBQ datasets swap the types of product_code and category3_code; both load into one catalog."""
    urls = []
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes((60 * i, 20, 20)))
        urls.append(str(tmp_path / f"{i}.jpg"))
    first = pd.DataFrame(
        [dbq_row(101, "Red Tote", "bags", 1290.0, urls[0]), dbq_row(102, "Blue Tote", "bags", 990.0, urls[1])]
    )
    second = pd.DataFrame(
        [dbq_row("X-1", "Hat", 7, "$250.00", urls[2], brand="B"), dbq_row("X-2", "Cap", 7, "$120", urls[3])]
    )
    assert first["product_code"].dtype != second["product_code"].dtype
    first.to_parquet(tmp_path / "first.parquet")
    second.to_json(tmp_path / "second.jsonl", orient="records", lines=True)
    sources = [str(tmp_path / "first.parquet"), str(tmp_path / "second.jsonl")]
    report = prepare(sources, tmp_path / "ds", allow_local=True, progress=False)
    assert [s["kept"] for s in report["sources"]] == [2, 2]
    catalog = load_catalog(tmp_path / "ds")
    assert list(catalog["product_code"]) == ["101", "102", "X-1", "X-2"]
    assert list(catalog["category"]) == ["bags", "bags", "7", "7"]
    assert list(catalog["full_price"]) == [1290.0, 990.0, 250.0, 120.0]
    assert catalog["image_path"].nunique() == 4


def test_hub_path_reads_local_dataset_directories(tmp_path):
    """`--source` goes through datasets.load_dataset / load_from_disk; offline, local directories work."""
    import datasets

    rows = []
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes((50 * i, 10, 10)))
        rows.append(dbq_row(f"P{i}", f"Tote {i}", "bags", 100 + i, str(tmp_path / f"{i}.jpg")))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(pd.DataFrame(rows[:2]))})
    saved.save_to_disk(str(tmp_path / "saved"))
    report = prepare(
        [str(tmp_path / "hub"), str(tmp_path / "saved")], tmp_path / "ds", allow_local=True, progress=False
    )
    assert [(s["rows"], s["kept"]) for s in report["sources"]] == [(4, 4), (2, 0)]
    assert report["dropped_by_reason"] == {"duplicate_row": 2}
    with pytest.raises(PhivisionError, match="no split 'test'"):
        prepare([str(tmp_path / "saved")], tmp_path / "x", hub_split="test", allow_local=True, progress=False)
    # a hub id while offline fails with one line naming the source
    with pytest.raises(PhivisionError, match="DBQ/Nowhere.Product.prices: cannot load dataset"):
        prepare(["DBQ/Nowhere.Product.prices"], tmp_path / "y", progress=False)


def test_file_names_cannot_escape_the_images_directory():
    stem = file_stem("../../etc/passwd", "http://x/a.jpg")
    assert "/" not in stem and not stem.startswith(".")
    assert stem.startswith("etc_passwd-")
    assert file_stem("", "http://x/a.jpg").startswith("image-")
    assert file_stem("A1", "http://x/a.jpg") != file_stem("A1", "http://x/b.jpg")


def test_sigkill_mid_run_loses_nothing_and_fetches_nothing_twice(tmp_path):
    """Kill `phivision prepare` while it downloads, rerun it: every image finished before the kill is reused
    (requested exactly once), no half-written file is ever visible, and the result equals an uninterrupted run."""
    with FaultServer(delay=0.1) as server:
        urls = [server.url(f"img/{i}.jpg") for i in range(60)]
        rows = [
            dbq_row(f"P{i:03d}", f"Item {i}", ["bags", "hats"][i % 2], 100 + i, u) for i, u in enumerate(urls)
        ]
        source = write_csv(tmp_path / "c.csv", rows)
        out = tmp_path / "ds"
        command = [
            sys.executable,
            "-m",
            "phivision.cli",
            "prepare",
            "--source",
            str(source),
            "--out",
            str(out),
        ]
        command += ["--concurrency", "2", "--no-progress"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        images = out / "images"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if images.is_dir() and sum(not p.name.startswith(".") for p in images.iterdir()) >= 10:
                break
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
        finished = [p for p in images.iterdir() if not p.name.startswith(".")]
        assert 10 <= len(finished) < 60 and not (out / "catalog.parquet").exists()
        for path in finished:  # atomic writes: whatever is visible is whole
            load_image(path)

        report = prepare([str(source)], out, concurrency=8, progress=False)
        assert report["counts"]["kept"] == 60
        assert report["images"]["reused"] == len(finished)
        assert report["images"]["downloaded"] == 60 - len(finished)
        assert not [p for p in images.iterdir() if p.name.endswith(".tmp")]
        finished_hashes = {p.name.split(".")[0].rsplit("-", 1)[-1] for p in finished}
        for i, url in enumerate(urls):
            if url_hash(url) in finished_hashes:
                assert server.counts[f"/img/{i}.jpg"] == 1  # finished before the kill: never fetched again
            else:
                assert server.counts[f"/img/{i}.jpg"] <= 2  # in flight at the kill: fetched once more at most
        for path in finished:
            assert path.read_bytes() == image_bytes()
        resumed = load_catalog(out)

        fresh = prepare([str(source)], tmp_path / "fresh", concurrency=8, progress=False)
        assert fresh["counts"] == report["counts"]
        pd.testing.assert_frame_equal(load_catalog(tmp_path / "fresh"), resumed)
        assert sum(server.counts[f"/img/{i}.jpg"] for i in range(60)) <= 60 + 2 + 60  # kill + resume + fresh


# ------------------------------------------------------------------------------------------- bad tables


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "no_url.csv",
            "product_code,title,category3_code,full_price,currency_code\nA,T,bags,10,USD\n",
            "column 'imageurl' not found (set --image-col)",
        ),
        (
            "bad_price.csv",
            "product_code,title,category3_code,full_price,currency_code,imageurl\nA,T,bags,free,USD,http://x/a.jpg\nB,T,bags,N.A.,USD,http://x/b.jpg\n",
            "column 'full_price': no value parses as a price (row 2: 'free')",
        ),
        ("empty.csv", "", "empty file"),
        ("header_only.csv", "product_code,title\n", "empty table (no rows)"),
        ("latin1.csv", "product_code,title\nA,Caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        ("table.xlsx", "whatever", "unknown file type '.xlsx'"),
        ("broken.jsonl", '{"product_code": "A"}\n{"product_code": \n', "line 2: invalid JSON"),
        ("missing.parquet", None, "missing.parquet: file not found"),
    ],
)
def test_bad_tables_exit_2_with_one_line(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(
        capsys, "prepare", "--source", str(path), "--out", str(tmp_path / "out"), "--no-progress"
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert str(path) in err and expected in err
    assert not (tmp_path / "out").exists()


def test_bad_flags_exit_2(tmp_path, capsys):
    source = tmp_path / "c.csv"
    source.write_text("product_code,title\nA,T\n")
    code, _, err = run_cli(
        capsys, "prepare", "--source", str(source), "--out", str(tmp_path / "o"), "--split", "a,b"
    )
    assert code == 2 and "--split 'a,b'" in err
    code, _, err = run_cli(
        capsys, "prepare", "--source", str(source), "--out", str(tmp_path / "o"), "--concurrency", "0"
    )
    assert code == 2 and "--concurrency 0" in err
