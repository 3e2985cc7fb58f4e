"""The output directory: another dataset is never silently replaced, files get the umask's permissions, a
symlinked images/ is a dataset like any other, and a full disk stops `prepare` with one line, damaging nothing."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fault_server import dbq_row, image_bytes

from cli_helpers import run_cli
from phivision.api import prepare, sample
from phivision.data import CATALOG_FILE, load_catalog
from phivision.data.sample import write_sample_catalog
from phivision.errors import PhivisionError
from phivision.io import atomic_write_bytes


def local_table(tmp_path: Path, n: int, name: str = "c.csv", size=(64, 48)) -> Path:
    images = tmp_path / "photos"
    images.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        path = images / f"{name}-{i}.jpg"
        path.write_bytes(image_bytes((10 * i % 250, 40, 90), size=size))
        rows.append(dbq_row(f"P{i}", f"Item {i}", ["bags", "hats"][i % 2], 100 + i, str(path)))
    source = tmp_path / name
    pd.DataFrame(rows).to_csv(source, index=False)
    return source


def test_out_holding_another_dataset_is_refused(tmp_path):
    out = tmp_path / "ds"
    write_sample_catalog(out, n=6, seed=0)
    before = (out / CATALOG_FILE).read_bytes()
    source = local_table(tmp_path, 4)
    with pytest.raises(PhivisionError) as info:
        prepare(str(source), out, allow_local=True, progress=False)
    message = str(info.value)
    assert (
        message
        == f"--out {out}: holds another dataset (sample of sample(n=6, seed=0)); pass --overwrite to replace it"
    )
    assert (out / CATALOG_FILE).read_bytes() == before
    # the same sample again is a rerun; another seed is another dataset
    write_sample_catalog(out, n=6, seed=0)
    with pytest.raises(PhivisionError, match="holds another dataset"):
        sample(out, n=6, seed=1)
    # --overwrite replaces the dataset, and a rerun of the same prepare resumes
    (out / "notes.txt").write_text("mine")
    report = prepare(str(source), out, allow_local=True, overwrite=True, progress=False)
    assert report["counts"]["kept"] == 4 and len(list((out / "images").iterdir())) == 4
    assert (out / "notes.txt").read_text() == "mine"  # only the dataset's own files were removed
    again = prepare(str(source), out, allow_local=True, progress=False)
    assert again["images"]["reused"] == 4
    # the same table named by another relative path is the same dataset
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert prepare("c.csv", out, allow_local=True, progress=False)["images"]["reused"] == 4
    finally:
        os.chdir(cwd)
    with pytest.raises(PhivisionError, match=r"holds another dataset \(prepare of .*c\.csv\)"):
        write_sample_catalog(out, n=6, seed=0)


def test_images_of_unknown_origin_are_refused(tmp_path):
    out = tmp_path / "ds"
    (out / "images").mkdir(parents=True)
    (out / "images" / "mine.jpg").write_bytes(image_bytes())
    with pytest.raises(PhivisionError, match="images/ without prepare_report.json"):
        prepare(str(local_table(tmp_path, 2)), out, allow_local=True, progress=False)
    assert (out / "images" / "mine.jpg").exists()


def test_cli_refuses_with_one_line(tmp_path, capsys):
    out = tmp_path / "ds"
    write_sample_catalog(out, n=6, seed=0)
    code, _, err = run_cli(capsys, "sample", "--out", str(out), "--n", "6", "--seed", "3")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --out {out}: holds another dataset (sample of sample(n=6, seed=0))")


def test_written_files_get_the_umask_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        write_sample_catalog(tmp_path / "ds", n=6, seed=0)
        atomic_write_bytes(tmp_path / "x" / "y.bin", b"1")
        prepare(str(local_table(tmp_path, 2)), tmp_path / "p", allow_local=True, progress=False)
    finally:
        os.umask(previous)
    for path in [
        tmp_path / "ds" / CATALOG_FILE,
        tmp_path / "ds" / "prepare_report.json",
        tmp_path / "x" / "y.bin",
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    for path in (tmp_path / "p" / "images").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert stat.S_IMODE((tmp_path / "p" / CATALOG_FILE).stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "p" / "images").stat().st_mode) == 0o750


def test_a_symlinked_images_directory_is_accepted(tmp_path):
    dataset = write_sample_catalog(tmp_path / "ds", n=6, seed=0)
    shared = tmp_path / "shared-storage" / "images"
    shared.parent.mkdir()
    shutil.move(dataset / "images", shared)
    (dataset / "images").symlink_to(shared, target_is_directory=True)
    catalog = load_catalog(dataset)
    assert len(catalog) == 6
    for bad, why in (("../x.jpg", "leaves the directory"), ("/etc/passwd", "is an absolute path")):
        frame = pd.read_parquet(dataset / CATALOG_FILE)
        frame.loc[1, "image_path"] = bad
        frame["image_paths"] = [[p] for p in frame["image_path"]]
        frame.to_parquet(dataset / "catalog.parquet")
        with pytest.raises(PhivisionError, match=f"row 3: column 'image_path': '{bad}' {why}"):
            load_catalog(dataset)
    # prepare downloads into a symlinked images/ too, and a rerun reuses what is there
    out = tmp_path / "prepared"
    source = local_table(tmp_path, 3)
    prepare(str(source), out, allow_local=True, progress=False)
    elsewhere = tmp_path / "cache" / "images"
    elsewhere.parent.mkdir()
    shutil.move(out / "images", elsewhere)
    (out / "images").symlink_to(elsewhere, target_is_directory=True)
    report = prepare(str(source), out, allow_local=True, progress=False)
    assert report["images"]["reused"] == 3 and len(load_catalog(out)) == 3
    # --overwrite unlinks the link and leaves the shared images alone
    prepare(str(local_table(tmp_path, 2, "other.csv")), out, allow_local=True, overwrite=True, progress=False)
    assert len(list(elsewhere.iterdir())) == 3 and not (out / "images").is_symlink()


# ------------------------------------------------------------------------------------------- full disk
# A real full disk needs a filesystem we can fill: mounting a small tmpfs or a loop device needs root, and
# /dev/full has no directories. RLIMIT_FSIZE gives the same failure for real: the kernel refuses write(2) past
# the limit (EFBIG instead of ENOSPC) in the middle of a file, in a child process, with no privileges. The
# limit applies per file, so it can stop either the images (a limit below their size) or only the catalog
# (a limit above every image, below the catalog).


def run_limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "phivision.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        env=env,
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_a_full_disk_stops_prepare_with_one_line_and_damages_nothing(tmp_path):
    out = tmp_path / "ds"
    small = local_table(tmp_path, 6, "grow.csv")
    prepare(str(small), out, allow_local=True, progress=False)
    before = snapshot(out)

    # 1. the images: the new rows' photos are larger than the limit
    grown = pd.read_csv(small)
    bigger = local_table(tmp_path, 3, "big.csv", size=(640, 480))
    table = pd.concat([grown, pd.read_csv(bigger)], ignore_index=True)
    table.to_csv(small, index=False)
    largest_old = max(len(v) for k, v in before.items() if k.startswith("images/"))
    result = run_limited(
        ["prepare", "--source", str(small), "--out", str(out), "--allow-local", "--no-progress"], 4096
    )
    assert largest_old < 4096
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert f"{out / 'images'}/" in result.stderr and "cannot write: File too large" in result.stderr
    assert snapshot(out) == before  # the catalog, the report and every image are untouched, no temporary file

    # 2. the catalog: every image fits, the new catalog does not
    catalog_size = len(before[CATALOG_FILE])
    images_ok = max(len(p.read_bytes()) for p in (tmp_path / "photos").glob("big.csv-*.jpg")) + 1
    assert images_ok < catalog_size
    result = run_limited(
        ["prepare", "--source", str(small), "--out", str(out), "--allow-local", "--no-progress"], images_ok
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"error: {out / CATALOG_FILE}: cannot write: File too large" in result.stderr
    after = snapshot(out)
    assert (
        after[CATALOG_FILE] == before[CATALOG_FILE]
        and after["prepare_report.json"] == before["prepare_report.json"]
    )
    assert not [name for name in after if name.endswith(".tmp")]
    assert len(load_catalog(out)) == 6  # still the complete earlier dataset

    # with room again, the rerun finishes (reusing the three images written before the failure)
    report = prepare(str(small), out, allow_local=True, progress=False)
    assert report["counts"]["kept"] == 9 and report["images"]["reused"] == 9


def test_a_killed_sample_is_redone_by_the_same_command(tmp_path):
    out = tmp_path / "ds"
    write_sample_catalog(out, n=6, seed=0)
    (out / CATALOG_FILE).unlink()  # as if killed while drawing: the marker report and some images remain
    report = json.loads((out / "prepare_report.json").read_text())
    (out / "prepare_report.json").write_text(json.dumps({"dataset": report["dataset"], "status": "drawing"}))
    write_sample_catalog(out, n=6, seed=0)
    assert len(load_catalog(out)) == 6
    with pytest.raises(PhivisionError, match="holds another dataset"):
        write_sample_catalog(out, n=7, seed=0)


# ------------------------------------------------------------------------------------ --overwrite
# --overwrite builds the new dataset beside the old one and swaps it in only when it is complete: a source inside
# --out is read whole before anything is replaced, and a failed, refused or killed run loses nothing.


def test_overwrite_from_a_source_inside_out_reads_it_first(tmp_path):
    out = tmp_path / "ds"
    write_sample_catalog(out, n=8, seed=0)
    # the dataset's own catalog as the product table, its images as local files: prepare over itself
    catalog = pd.read_parquet(out / CATALOG_FILE)
    catalog["image_path"] = [str(out / p) for p in catalog["image_path"]]
    catalog.to_parquet(out / "table.parquet")
    options = dict(
        category_col="category", price_col="full_price", image_col="image_path", currency_col="currency"
    )
    report = prepare(
        str(out / "table.parquet"), out, allow_local=True, overwrite=True, progress=False, **options
    )
    assert report["counts"]["kept"] == 8
    assert len(load_catalog(out)) == 8 and len(list((out / "images").iterdir())) == 8
    assert not (out / ".replacement").exists() and (out / "table.parquet").exists()


def test_a_failed_overwrite_leaves_the_old_dataset_whole(tmp_path, capsys):
    out = tmp_path / "ds"
    write_sample_catalog(out, n=8, seed=0)
    before = snapshot(out)
    # the catalog itself as --source: no image column in it, so prepare fails after the claim
    code, _, err = run_cli(
        capsys,
        "prepare",
        "--source",
        str(out / CATALOG_FILE),
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
    )
    assert code == 2 and err.count("\n") == 1 and "column 'imageurl' not found" in err
    assert snapshot(out) == before and not (out / ".replacement").exists()
    # a table whose images all fail: the failure report is kept beside the old dataset, which stays whole
    table = tmp_path / "t.csv"
    pd.DataFrame([dbq_row("P1", "Item", "bags", 10, str(tmp_path / "missing.jpg"))]).to_csv(
        table, index=False
    )
    with pytest.raises(
        PhivisionError, match=r"no product survived .* see .*\.replacement/prepare_report\.json"
    ):
        prepare(str(table), out, allow_local=True, overwrite=True, progress=False)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".replacement")} == before


def test_a_killed_overwrite_is_resumed_and_a_cut_swap_is_finished(tmp_path):
    out = tmp_path / "ds"
    write_sample_catalog(out, n=8, seed=0)
    before = snapshot(out)
    source = local_table(tmp_path, 5)
    # killed while downloading: the replacement holds its marker report and some images; the old dataset is whole
    staging = out / ".replacement"
    (staging / "images").mkdir(parents=True)
    from phivision.data.layout import dataset_identity

    identity = dataset_identity("prepare", [str(source)])
    (staging / "prepare_report.json").write_text(json.dumps({"dataset": identity, "status": "downloading"}))
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".replacement")} == before
    report = prepare(str(source), out, allow_local=True, overwrite=True, progress=False)
    assert report["counts"]["kept"] == 5 and len(load_catalog(out)) == 5 and not staging.exists()

    # killed between the renames of the swap: the next run of any command on --out finishes the swap first
    replacement = tmp_path / "next"
    write_sample_catalog(replacement, n=3, seed=9)
    staging.mkdir()
    shutil.move(out / "images", staging / "old-images")  # the first rename done, the rest not
    for name in ("images", CATALOG_FILE, "prepare_report.json"):
        shutil.move(replacement / name, staging / name)
    (staging / ".complete").write_text("")
    write_sample_catalog(out, n=3, seed=9)  # the same dataset the swap installs: a rerun, nothing redrawn
    assert len(load_catalog(out)) == 3 and not staging.exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        load_catalog(out)["image_path"].str[7:]
    )


def test_sample_overwrite_swaps_only_when_complete(tmp_path, capsys):
    out = tmp_path / "ds"
    write_sample_catalog(out, n=6, seed=0)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "sample", "--out", str(out), "--n", "5", "--seed", "1")
    assert code == 2 and snapshot(out) == before  # refused: nothing touched
    sample(out, n=5, seed=1, overwrite=True)
    assert len(load_catalog(out)) == 5 and len(list((out / "images").iterdir())) == 5
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".replacement").exists()
