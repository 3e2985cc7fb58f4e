"""A disk that really fills up: a small tmpfs, mounted in a private mount namespace (as root, or through an
unprivileged user namespace where the kernel allows one). Training stops at the checkpoint that does not fit with
one line, the earlier checkpoints stay whole and `--resume` finishes the run once there is room; an export that
does not fit leaves nothing behind. (The error table covers the same failures everywhere with RLIMIT_FSIZE.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _namespace_prefix(tmp_path: Path) -> list[str] | None:
    """``unshare`` arguments under which a shell may mount a tmpfs, or None on a machine that allows neither."""
    if shutil.which("unshare") is None:
        return None
    probe = tmp_path / "probe"
    probe.mkdir()
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        done = subprocess.run(
            [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
            capture_output=True,
            timeout=30,
        )
        if done.returncode == 0:
            return prefix
    return None


def test_a_full_tmpfs_stops_training_and_export_with_one_line_and_resume_finishes(
    tmp_path, tiny_checkpoint, sample_dataset
):
    prefix = _namespace_prefix(tmp_path)
    if prefix is None:
        pytest.skip("no mount namespace here (needs root or unprivileged user namespaces)")
    disk, small = tmp_path / "disk", tmp_path / "small"
    disk.mkdir()
    small.mkdir()
    phivision = f"{sys.executable} -m phivision.cli"
    train = (
        f"{phivision} train --out {disk}/run --data {sample_dataset} --model {tiny_checkpoint} "
        "schedule.max_steps=4 checkpoint.every_steps=1 checkpoint.keep_last=10 eval.max_samples=2 tracking.log_every=1 "
        "eval.gen_samples=0 data.batch_size=2"
    )
    # 2 MB hold the run and two checkpoints (about 0.9 MB each), not a third
    script = f"""
        mount -t tmpfs -o size=2m tmpfs {disk}
        {train} > {tmp_path}/full.out 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.code
        ls -a {disk}/run/checkpoints > {tmp_path}/after_full.txt
        mount -o remount,size=64m {disk}
        {phivision} train --resume --out {disk}/run > /dev/null 2> {tmp_path}/resume.err
        echo $? > {tmp_path}/resume.code
        mount -t tmpfs -o size=1m tmpfs {small}
        {phivision} export --run {disk}/run --out {small}/export 2> {tmp_path}/export.err
        echo $? > {tmp_path}/export.code
        ls -a {small} > {tmp_path}/after_export.txt
        cp -r {disk}/run {tmp_path}/run
    """
    subprocess.run([*prefix, "sh", "-c", script], check=True, timeout=900)

    errors = [line for line in (tmp_path / "full.err").read_text().splitlines() if line.startswith("error:")]
    assert (tmp_path / "full.code").read_text().strip() == "2"
    assert errors == [f"error: {disk}/run/checkpoints/step-3: cannot write: No space left on device"]
    assert "Traceback" not in (tmp_path / "full.err").read_text()
    assert (tmp_path / "after_full.txt").read_text().split() == [".", "..", "step-1", "step-2"]  # no .tmp

    assert (tmp_path / "resume.code").read_text().strip() == "0", (tmp_path / "resume.err").read_text()[
        -2000:
    ]
    run = tmp_path / "run"
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["done"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["type"], r["step"]) for r in records]
    assert len(logged) == len(set(logged)) and ("eval", 4) in logged  # nothing logged twice, the end reached

    export_err = (tmp_path / "export.err").read_text()
    assert (tmp_path / "export.code").read_text().strip() == "2", export_err[-2000:]
    assert f"error: {small}/export: cannot write: No space left on device" in export_err.splitlines()
    assert (tmp_path / "after_export.txt").read_text().split() == [".", ".."]  # nothing left behind
