"""A run is never lost, never hijacked: no pickle ever runs on resume, foreign or damaged weights stop with one
line naming the tensors, the best weights survive a resume, broken images and paths are one error line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from phivision.errors import PhivisionError
from phivision.train import checkpoint as ckpt
from phivision.train import train


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "phivision.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------- nothing is unpickled


class _Payload:
    """A pickle that creates ``marker`` when unpickled: what a hostile run folder would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker)}, path)


@pytest.fixture
def finished_run(quick_config):
    """A 2-step LoRA run with a checkpoint per step."""
    cfg = quick_config("victim", "schedule.max_steps=2", "checkpoint.every_steps=1", "eval.gen_samples=0")
    return cfg, train(cfg, progress=False).out


def test_checkpoints_hold_only_safetensors_and_json(finished_run):
    _, run = finished_run
    for _, path in ckpt.list_checkpoints(run):
        for file in path.rglob("*"):
            if file.is_file():
                assert file.suffix in (".json", ".safetensors", ".md"), file  # README.md from PEFT
                assert not file.read_bytes().startswith((b"\x80", b"PK")), file  # no pickle, no torch zip


def test_resume_never_runs_a_planted_pickle(finished_run, tmp_path):
    cfg, run = finished_run
    marker = tmp_path / "pwned"
    newest = ckpt.list_checkpoints(run)[-1][1]
    # the old layout's file names and accelerate's, each holding a payload, beside the real state
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt", "random_states_0.pkl", "optimizer.bin"):
        _plant(newest / name, marker)
    resumed = _cli("train", "--resume", "--out", cfg.out, "schedule.max_steps=3", "checkpoint.every_steps=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists()

    # a folder that only has the pickled state (the old layout) is refused, and still nothing runs
    newest = ckpt.list_checkpoints(run)[-1][1]
    for stem in ("optimizer", "scheduler", "rng-0"):
        for suffix in (".json", ".safetensors"):
            (newest / f"{stem}{suffix}").unlink(missing_ok=True)
        _plant(newest / f"{stem}.pt", marker)
    (newest / "optimizer.safetensors").write_bytes(
        (newest / "optimizer.pt").read_bytes()
    )  # a pickle in disguise
    refused = _cli("train", "--resume", "--out", cfg.out, "schedule.max_steps=5")
    assert f"{newest}: holds pickled state (*.pt) from an older phivision, which is never unpickled" in (
        _one_error_line(refused)
    )
    assert not marker.exists()

    # the payload is live: loading it the way the old code did would have run it
    torch.load(newest / "optimizer.pt", weights_only=False)
    assert marker.exists()


def test_libraries_loading_inside_a_restore_cannot_unpickle(tmp_path):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "engine.bin", marker)
    with ckpt.weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "engine.bin", weights_only=False)  # e.g. an engine asking for a full unpickle
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after the block


def test_optimizer_and_grad_scaler_state_round_trip_as_tensors_and_json(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for x in (torch.randn(2, 4), torch.full((2, 4), float("inf"))):  # one good step, one overflow (backoff)
        scaler.scale(model(x).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        ckpt.save_tree(obj.state_dict(), tmp_path / name)

    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.95))
    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda s: 1 / (s + 1))
    twin_scaler = torch.amp.GradScaler("cpu")
    twin_opt.load_state_dict(ckpt.load_tree(tmp_path / "optimizer"))
    twin_sched.load_state_dict(ckpt.load_tree(tmp_path / "scheduler"))
    twin_scaler.load_state_dict(ckpt.load_tree(tmp_path / "scaler"))
    assert twin_scaler.state_dict() == scaler.state_dict() and scaler.get_scale() == 512.0
    assert twin_sched.state_dict()["last_epoch"] == 2
    x = torch.randn(2, 4)
    for m, opt in ((model, optimizer), (twin, twin_opt)):
        m(x).sum().backward()
        opt.step()
    assert torch.equal(model.weight, twin.weight)  # the same moments and step count


def test_rng_state_round_trips(tmp_path):
    import random

    import numpy as np

    ckpt.save_tree(ckpt.rng_state(), tmp_path / "rng")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_tree(tmp_path / "rng"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# --------------------------------------------------------------------------- the best weights survive


def test_a_resumed_run_ends_with_the_best_weights_of_the_whole_run(quick_config):
    # an untrained tiny model never writes a parseable answer: parse_rate stays 0, so the first evaluation
    # (step 1) stays the best and the resumed steps never replace RUN/adapter
    args = ("schedule.max_steps=4", "eval.every_steps=1", "eval.metric=parse_rate", "checkpoint.every_steps=1",
            "checkpoint.keep_last=4", "optim.lr=5e-3")  # fmt: skip
    run = train(quick_config("best", *args), progress=False).out
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["best_step"] == 1
    step1 = load_file(run / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors")
    for step in (2, 3):  # every checkpoint carries the best weights so far
        best = load_file(run / "checkpoints" / f"step-{step}" / "best" / "adapter_model.safetensors")
        assert all(torch.equal(best[k], step1[k]) for k in step1)

    # a kill after step 2: later checkpoints lost, RUN/adapter overwritten by weights of a lost evaluation
    for step in (3, 4):
        shutil.rmtree(run / "checkpoints" / f"step-{step}")
    stray = run / "checkpoints" / "step-2" / "adapter"
    shutil.rmtree(run / "adapter")
    shutil.copytree(stray, run / "adapter")
    train(quick_config("best", *args), resume=True, progress=False)
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], step1[k]) for k in step1)


# ------------------------------------------------------------------------------- strict weight loading


def _altered_checkpoint(tiny_checkpoint: Path, out: Path, change) -> Path:
    shutil.copytree(tiny_checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


QKV = "model.layers.0.self_attn.qkv_proj.weight"
BAD_BASES = {
    "missing": (lambda t: t.pop(QKV), rf"missing 1 tensor\(s\) \({QKV}\)"),
    "unexpected": (lambda t: t.update(extra=torch.zeros(2)), r"unexpected 1 tensor\(s\) \(extra\)"),
    "misshaped": (
        lambda t: t.update({"lm_head.weight": torch.zeros(3, 3)}),
        r"mis-shaped 1 tensor\(s\) \(lm_head\.weight: checkpoint \[3, 3\], model \[\d+, \d+\]\)",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_BASES))
def test_a_base_checkpoint_that_does_not_match_stops_train_and_load_model(
    kind, tiny_checkpoint, quick_config, tmp_path
):
    from phivision.runs import load_model

    change, message = BAD_BASES[kind]
    bad = _altered_checkpoint(tiny_checkpoint, tmp_path / kind, change)
    with pytest.raises(PhivisionError, match=message) as info:
        load_model(bad, device="cpu")
    assert "\n" not in str(info.value)
    cfg = quick_config("on-bad-base")
    cfg.model = str(bad)
    with pytest.raises(PhivisionError, match=message):
        train(cfg, progress=False)
    assert not (Path(cfg.out) / "trainer_state.json").exists()


def test_the_documented_duplicate_embedding_is_tolerated(tiny_checkpoint, tmp_path):
    from phivision.runs import load_model

    dup = _altered_checkpoint(
        tiny_checkpoint,
        tmp_path / "wte",
        lambda t: t.__setitem__(
            "model.vision_embed_tokens.wte.weight", t["model.embed_tokens.weight"].clone()
        ),
    )
    assert load_model(dup, device="cpu").model is not None


def test_another_model_type_is_refused(tiny_checkpoint, tmp_path, quick_config):
    from phivision.runs import load_model

    other = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    cfg = quick_config("on-llama")
    cfg.model = str(other)
    with pytest.raises(PhivisionError, match="model_type 'llama', not 'phi3_v'"):
        train(cfg, progress=False)
    with pytest.raises(PhivisionError):  # not even recognised as a checkpoint directory
        load_model(other, device="cpu")


@pytest.fixture
def lora_run(quick_config):
    cfg = quick_config("adapter", "schedule.max_steps=1", "eval.gen_samples=0")
    return cfg, train(cfg, progress=False).out


def _alter_adapter(folder: Path, change) -> str:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(k for k in tensors if "lora_A" in k)[0]
    change(tensors, name)
    save_file(tensors, str(path))
    return name


def test_an_adapter_with_a_missing_or_misshaped_tensor_is_refused(lora_run):
    from phivision.runs import load_model

    _, run = lora_run
    name = _alter_adapter(run / "adapter", lambda t, k: t.pop(k))
    with pytest.raises(PhivisionError, match=rf"missing 1 tensor\(s\) \({name}\)"):
        load_model(run, device="cpu")
    _alter_adapter(run / "adapter", lambda t, k: t.__setitem__(k, torch.zeros(3, 5)))
    with pytest.raises(PhivisionError, match=r"mis-shaped 1 tensor\(s\) \(.*lora_A.*checkpoint \[3, 5\]"):
        load_model(run, device="cpu")


def test_resume_from_a_checkpoint_with_a_missing_tensor_is_refused(lora_run, quick_config):
    cfg, run = lora_run
    newest = ckpt.list_checkpoints(run)[-1][1]
    name = _alter_adapter(newest / "adapter", lambda t, k: t.pop(k))
    cfg = quick_config("adapter", "schedule.max_steps=2", "eval.gen_samples=0")
    with pytest.raises(
        PhivisionError, match=rf"{newest / 'adapter'}: does not match the model: missing 1 .*{name}"
    ):
        train(cfg, resume=True, progress=False)


# ------------------------------------------------------------------------------ paths and bad images


def test_out_that_is_a_file_is_one_error_line(tmp_path, tiny_checkpoint, sample_dataset):
    out = tmp_path / "run.txt"
    out.write_text("keep me\n")
    line = _one_error_line(
        _cli("train", "--out", str(out), "--data", str(sample_dataset), "--model", str(tiny_checkpoint))
    )
    assert "is a file, not a run directory" in line
    assert out.read_text() == "keep me\n"


def _dataset_copy(sample_dataset: Path, out: Path) -> tuple[Path, pd.DataFrame]:
    shutil.copytree(sample_dataset, out)
    return out, pd.read_parquet(out / "catalog.parquet")


def _png_header_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says ``width`` x ``height``: a decompression bomb's calling card."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC covers type + data
    return bytes(data)


@pytest.mark.parametrize("kind", ["bomb", "garbage"])
def test_an_unreadable_image_in_the_catalog_is_one_line_naming_the_row(
    kind, tmp_path, sample_dataset, tiny_checkpoint
):
    data, catalog = _dataset_copy(sample_dataset, tmp_path / "data")
    row = int(catalog.index[catalog["split"] == "train"][3])
    image = data / catalog.at[row, "image_path"]
    image.write_bytes(_png_header_claiming(100_000, 100_000) if kind == "bomb" else b"not an image at all")
    proc = _cli("train", "--out", str(tmp_path / "run"), "--data", str(data), "--model", str(tiny_checkpoint))
    line = _one_error_line(proc)
    assert f"catalog.parquet row {row + 1} ('{catalog.at[row, 'product_code']}')" in line
    assert str(image) in line
    assert ("pixels" in line) if kind == "bomb" else ("not a readable image" in line)
    assert not (tmp_path / "run").exists()  # stopped before the model loaded or anything was written


def test_an_image_damaged_after_its_header_stops_a_worker_run_with_one_line(
    tmp_path, sample_dataset, tiny_checkpoint
):
    data, catalog = _dataset_copy(sample_dataset, tmp_path / "data")
    for rel in catalog.loc[catalog["split"] == "train", "image_path"]:
        image = data / rel
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header intact, scan data cut
    proc = _cli("train", "--out", str(tmp_path / "run"), "--data", str(data), "--model", str(tiny_checkpoint),
                "data.num_workers=1", "data.batch_size=2", "schedule.max_steps=1")  # fmt: skip
    line = _one_error_line(proc)
    assert "truncated" in line and str(data / "images") in line


# -------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    ("n", "world", "batch"), [(1, 2, 4), (0, 2, 4), (5, 2, 2), (7, 3, 2), (8, 4, 1), (3, 8, 2)]
)
def test_every_rank_runs_the_same_number_of_val_batches(n, world, batch):
    from phivision.train.loop import val_loss_batches

    plans = [val_loss_batches(n, batch, rank, world) for rank in range(world)]
    assert len({len(p) for p in plans}) == 1
    counted = sorted(i for p in plans for rows, counts in p if counts for i in rows)
    assert counted == list(range(n))  # every row counted exactly once
    assert all(len(rows) <= batch for p in plans for rows, _ in p)


def test_evaluation_inside_training_shows_progress(quick_config, capfd):
    train(quick_config("bars", "schedule.max_steps=1", "eval.gen_samples=2"), progress=True)
    shown = capfd.readouterr().err
    assert "eval loss" in shown and "generate" in shown
    train(quick_config("quiet", "schedule.max_steps=1", "eval.gen_samples=2"), progress=False)
    quiet = capfd.readouterr().err
    assert "eval loss" not in quiet and "generate" not in quiet
