"""--resume after SIGKILL ends with the same loss curve as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from phivision.train import train
from phivision.train.tracking import read_metrics

STEPS = 10
ARGS = [
    f"schedule.max_steps={STEPS}",
    "checkpoint.every_steps=2",
    "schedule.warmup_steps=3",
    "lora.dropout=0.1",  # dropout draws from the RNG: resuming must restore it
    "eval.every_steps=5",
    "eval.metric=val_loss",
]


def _cli(cfg, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "phivision.cli", "train", "--out", cfg.out, "--data", cfg.data.path, "--model", cfg.model,
        *extra,
        *[f"{k}={v}" for k, v in (a.split("=", 1) for a in ARGS)],
        "data.batch_size=2", "optim.lr=1e-3", "tracking.log_every=1", "eval.gen_samples=2", "eval.max_samples=4",
        "eval.max_new_tokens=8",
    ]  # fmt: skip


def test_resume_after_sigkill_matches_an_uninterrupted_run(quick_config):
    reference = train(quick_config("reference", *ARGS))
    expected = read_metrics(reference.out, "train")
    cfg = quick_config("killed", *ARGS)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = os.path.join(cfg.out, "checkpoints")
    deadline = time.monotonic() + 120
    while not (os.path.isdir(checkpoints) and any(p.startswith("step-") for p in os.listdir(checkpoints))):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(int(p.split("-")[1]) for p in os.listdir(checkpoints) if p.startswith("step-"))
    assert killed_at < STEPS, "the run finished before it could be killed"

    done = subprocess.run(_cli(cfg, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout + done.stderr

    resumed = read_metrics(reference.out.parent / "killed", "train")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no step lost or logged twice
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in expected], rel=1e-5, abs=1e-6)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in expected])
    evals = read_metrics(reference.out.parent / "killed", "eval")
    assert [e["val_loss"] for e in evals] == pytest.approx(
        [e["val_loss"] for e in read_metrics(reference.out, "eval")], rel=1e-5
    )
