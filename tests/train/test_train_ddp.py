"""Two processes (torchrun or accelerate launch, gloo on CPU) at the same global batch train like one process."""

from __future__ import annotations

import os
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
