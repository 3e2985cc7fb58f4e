"""Two processes (torchrun or accelerate launch, gloo on CPU) at the same global batch train like one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phivision.train import train
from phivision.train.tracking import read_metrics

ARGS = ["method=full", "schedule.max_steps=3", "eval.gen_samples=0", "eval.max_samples=2", "optim.lr=1e-3"]


ACCELERATE_DDP = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "ddp.yaml"
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # the shipped GPU config; without GPUs accelerate starts the same processes on the gloo backend
    "accelerate": [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_DDP),
        "--num_processes", "2",
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_ddp_two_processes_match_one_process(quick_config, tmp_path, launcher):
    single = train(quick_config("single", "data.batch_size=4", *ARGS))
    cfg = quick_config("ddp", "data.batch_size=2", *ARGS)
    command = [
        *LAUNCHERS[launcher],
        "-m", "phivision.cli", "train", "--out", cfg.out, "--data", cfg.data.path, "--model", cfg.model,
        "data.batch_size=2", "tracking.log_every=1", *ARGS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one = read_metrics(single.out, "train")
    two = read_metrics(tmp_path / "ddp", "train")
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # the same global batches
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    val_one, val_two = read_metrics(single.out, "eval")[-1], read_metrics(tmp_path / "ddp", "eval")[-1]
    assert val_two["val_loss"] == pytest.approx(val_one["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_two_processes_evaluate_fewer_val_rows_than_processes(quick_config, sample_dataset, tmp_path):
    """One val row, two ranks: rank 1 has no row of its own, yet both run the same forward passes (a sharded
    engine would hang otherwise) and the val loss and generation metrics equal one process's."""
    import pandas as pd

    data = tmp_path / "one-val"
    shutil.copytree(sample_dataset / "images", data / "images")  # a symlink would point outside the dataset
    catalog = pd.read_parquet(sample_dataset / "catalog.parquet")
    val = catalog.index[catalog["split"] == "val"]
    catalog.loc[val[1:], "split"] = "test"
    catalog.to_parquet(data / "catalog.parquet", index=False)
    args = [*ARGS[:2], "eval.gen_samples=1", "eval.every_steps=2", "eval.max_samples=0", "optim.lr=1e-3"]

    cfg = quick_config("one-val-single", "data.batch_size=4", *args)
    cfg.data.path = str(data)
    single = train(cfg, progress=False)
    command = [
        *LAUNCHERS["torchrun"],
        "-m", "phivision.cli", "train", "--out", str(tmp_path / "one-val-ddp"), "--data", str(data),
        "--model", cfg.model, "data.batch_size=2", "tracking.log_every=1", "eval.max_new_tokens=8", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = read_metrics(single.out, "eval"), read_metrics(tmp_path / "one-val-ddp", "eval")
    assert [e["step"] for e in two] == [e["step"] for e in one] == [2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["parse_rate"] == a["parse_rate"] and b["title_similarity"] == pytest.approx(
            a["title_similarity"]
        )
