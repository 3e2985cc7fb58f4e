"""`prepare` against the open web's worst: every failure is one dropped row with a reason, nothing aborts or
hangs, link-local and metadata addresses are never contacted, local files are regular files only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from fault_server import dbq_row, image_bytes

from phivision.api import prepare
from phivision.data import load_catalog
from phivision.data.download import url_problem
from phivision.netguard import AddressPolicy


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def web_rows(server) -> list[dict]:
    u = server.url
    return [
        dbq_row("OK1", "Fine Tote", "bags", 100, u("img/ok.jpg")),
        dbq_row("UNI", "Accent Tote", "bags", 110, u("img/ét\u00e9-photo.jpg")),  # non-ASCII path: fine
        dbq_row("GZ", "Gzip Tote", "bags", 120, u("gzip/g.jpg")),  # wrong Content-Encoding
        dbq_row("DRIP", "Drip Hat", "hats", 130, u("drip/d.jpg")),  # one byte at a time, never in time
        dbq_row("META", "Meta Hat", "hats", 140, u("metadata/m.jpg")),  # redirect to 169.254.169.254
        dbq_row("LL", "Link Hat", "hats", 150, "http://169.254.169.254/latest/meta-data/x.jpg"),
        dbq_row("ALI", "Alias Hat", "hats", 160, "http://100.100.100.200/latest/meta-data/x.jpg"),
        dbq_row("V6", "Mapped Hat", "hats", 165, "http://[::ffff:169.254.169.254]/x.jpg"),
        dbq_row("FTP", "Ftp Scarf", "scarves", 170, u("ftp/f.jpg")),  # redirect to ftp://
        dbq_row("BAD6", "Bracket Scarf", "scarves", 180, "http://[::1/a.jpg"),  # malformed
        dbq_row("IDN", "Idna Scarf", "scarves", 190, "http://-bad-\u00e9.example/a.jpg"),  # invalid IDNA host
        dbq_row("SPACE", "Space Scarf", "scarves", 200, "http://exa mple.com/a.jpg"),
    ]


EXPECTED_REASONS = {
    "decoding_error": 1,
    "download_timeout": 1,
    "blocked_link_local": 4,
    "unsupported_url": 1,
    "malformed_url": 3,
}


def test_web_faults_drop_rows_and_the_run_goes_on(tmp_path, server, fast_download):
    source = write_csv(tmp_path / "web.csv", web_rows(server))
    out = tmp_path / "ds"
    started = time.monotonic()
    report = prepare(str(source), out, **fast_download, progress=False)
    assert time.monotonic() - started < 30  # the drip ended at its deadline, not after the whole body

    assert report["counts"] == {"rows": 12, "kept": 2, "dropped": 10}
    assert report["dropped_by_reason"] == EXPECTED_REASONS
    failed = {row["product_code"]: row for row in report["failed"]}
    assert failed["GZ"]["reason"] == "decoding_error"
    assert failed["DRIP"]["reason"] == "download_timeout" and "1.5 s" in failed["DRIP"]["detail"]
    for code in ("META", "LL", "ALI", "V6"):
        assert failed[code]["reason"] == "blocked_link_local", code
    assert failed["BAD6"]["row"] == 11 and failed["BAD6"]["url"] == "http://[::1/a.jpg"
    # the drip was tried once (no retry of a deadline); the metadata redirect reached nobody
    assert server.counts["/drip/d.jpg"] == 1
    assert server.counts["/metadata/m.jpg"] == 1
    assert sorted(load_catalog(out)["product_code"]) == ["OK1", "UNI"]

    # the rerun goes on too: the good images are reused, the faults fail the same way again
    again = prepare(str(source), out, **fast_download, progress=False)
    assert again["dropped_by_reason"] == EXPECTED_REASONS
    assert (again["images"]["reused"], again["images"]["downloaded"]) == (2, 0)


def test_a_name_resolving_to_loopback_is_refused_by_a_strict_policy(tmp_path, server, fast_download):
    """The policy is applied to the addresses a name resolves to, not to the name."""
    port = server.httpd.server_address[1]
    rows = [
        dbq_row("N1", "Named Tote", "bags", 100, f"http://localhost:{port}/img/n.jpg"),
        dbq_row("N2", "Numbered Tote", "bags", 100, f"http://127.0.0.1:{port}/img/m.jpg"),
    ]
    source = write_csv(tmp_path / "c.csv", rows)
    strict = AddressPolicy(allow_loopback=False, allow_private=False)
    with pytest.raises(Exception, match="no product survived"):
        prepare(str(source), tmp_path / "ds", **fast_download, policy=strict, progress=False)
    report = json.loads((tmp_path / "ds" / "prepare_report.json").read_text())
    assert report["dropped_by_reason"] == {"blocked_loopback": 2}
    assert server.counts["/img/n.jpg"] == server.counts["/img/m.jpg"] == 0
    # the default policy allows a local image server
    assert prepare(str(source), tmp_path / "ok", **fast_download, progress=False)["counts"]["kept"] == 2


@pytest.mark.timeout(60)
def test_local_files_are_regular_files_of_bounded_size(tmp_path, fast_download):
    good = tmp_path / "good.jpg"
    good.write_bytes(image_bytes())
    (tmp_path / "link.jpg").symlink_to(good)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(5_000_000)  # sparse: costs no disk
    rows = [
        dbq_row("GOOD", "Good Tote", "bags", 100, str(good)),
        dbq_row("LINK", "Linked Tote", "bags", 101, (tmp_path / "link.jpg").as_uri()),
        dbq_row("FIFO", "Fifo Tote", "bags", 102, str(fifo)),
        dbq_row("ZERO", "Zero Tote", "bags", 103, "/dev/zero"),  # endless
        dbq_row("URANDOM", "Random Tote", "bags", 104, "file:///dev/urandom"),
        dbq_row("DIR", "Folder Tote", "bags", 105, str(tmp_path)),
        dbq_row("BIG", "Big Tote", "bags", 106, str(big)),
        dbq_row("GONE", "Gone Tote", "bags", 107, str(tmp_path / "gone.jpg")),
    ]
    source = write_csv(tmp_path / "c.csv", rows)
    report = prepare(
        str(source), tmp_path / "ds", **fast_download, allow_local=True, max_bytes=1_000_000, progress=False
    )
    assert report["counts"] == {"rows": 8, "kept": 2, "dropped": 6}
    assert report["dropped_by_reason"] == {"not_a_regular_file": 4, "too_large": 1, "missing": 1}


@pytest.mark.parametrize(
    ("url", "allow_local", "problem"),
    [
        ("http://example.com/a.jpg", False, None),
        ("https://例え.jp/画像.jpg", False, None),
        ("http://[::1/a.jpg", False, "malformed_url"),
        ("http://[::1]:8000/a.jpg", False, None),
        ("http:///a.jpg", False, "malformed_url"),
        ("http://x/\ud800.jpg", False, "malformed_url"),
        ("ftp://example.com/a.jpg", False, "unsupported_url"),
        ("/data/a.jpg", False, "unsupported_url"),
        ("/data/a.jpg", True, None),
        ("file:///data/a.jpg", True, None),
        ("", False, "missing_image_url"),
        (None, False, "missing_image_url"),
        (float("nan"), False, "missing_image_url"),
    ],
)
def test_url_problem_never_raises(url, allow_local, problem):
    assert url_problem(url, allow_local) == problem
