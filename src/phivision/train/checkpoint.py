"""Checkpoints: the loadable weights plus everything needed to continue a run exactly.

``checkpoints/step-N/`` holds ``adapter/`` (PEFT format) or ``model/`` (``save_pretrained``), ``optimizer.pt``,
``scheduler.pt``, ``rng-<rank>.pt`` and ``trainer_state.json``. Each is written into a hidden temporary directory
that is renamed into place only when complete, so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phivision.errors import PhivisionError
from phivision.io import atomic_write_json

_STEP_DIR = re.compile(r"^step-(\d+)$")


def weights_dirname(method: str) -> str:
    return "model" if method == "full" else "adapter"


def _fsync_dir(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` over ``final``; the old ``final`` survives as ``final.old`` until then."""
    _fsync_dir(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(final: Path) -> None:
    """Undo a kill between the two renames of :func:`replace_dir`."""
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():
        os.replace(old, final)


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def save_weights(accelerator: Any, model: torch.nn.Module, out: Path) -> None:
    """The loadable export: a PEFT adapter (adapter_config.json + adapter_model.safetensors) or the full model.

    Every rank must call this: under ZeRO-3 or FSDP gathering the full weights is a collective. The main process
    writes ``out`` whole or, if killed, leaves a temporary directory that is never mistaken for weights.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = out.with_name(f".{out.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        accelerator.unwrap_model(model).save_pretrained(
            str(tmp), state_dict=state_dict, safe_serialization=True
        )
        replace_dir(tmp, out)
    accelerator.wait_for_everyone()


def load_weights(model: torch.nn.Module, src: Path, method: str) -> None:
    """Load trained weights saved by :func:`save_weights` back into the live (possibly PEFT-wrapped) model."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise PhivisionError(f"{src}: no .safetensors weights in this checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "full":
        result = model.load_state_dict(state, strict=False)
        missing = trainable & set(result.missing_keys)
        if result.unexpected_keys or missing:
            raise PhivisionError(
                f"{src}: weights do not match the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(result.unexpected_keys)[:3]})"
            )
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if k in trainable]
    if result.unexpected_keys or missing:
        raise PhivisionError(
            f"{src}: adapter does not match the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories never match ``step-N``)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    run_dir: Path,
    method: str,
    keep_last: int,
) -> Path:
    """Write ``checkpoints/step-N`` atomically from all ranks (each saves its RNG state), then prune old ones."""
    step = state["step"]
    final = run_dir / "checkpoints" / f"step-{step}"
    tmp = run_dir / "checkpoints" / f".step-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    save_weights(accelerator, model, tmp / weights_dirname(method))
    if _sharded(accelerator):  # ZeRO/FSDP: each rank holds its own optimizer shard
        torch.save(optimizer.state_dict(), tmp / f"optimizer-{rank}.pt")
    if accelerator.is_main_process:
        if not _sharded(accelerator):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        atomic_write_json(tmp / "trainer_state.json", state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ckpt: Path,
    method: str,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the saved trainer state."""
    from accelerate.utils import DistributedType

    stage = getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", 0)
    if accelerator.distributed_type == DistributedType.FSDP or stage == 3:
        raise PhivisionError(f"{ckpt}: --resume of FSDP or ZeRO-3 runs is not supported; use DDP or ZeRO-2")
    load_weights(accelerator.unwrap_model(model), ckpt / weights_dirname(method), method)
    rank_file = ckpt / f"optimizer-{accelerator.process_index}.pt"
    optimizer_file = rank_file if rank_file.exists() else ckpt / "optimizer.pt"
    optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng_file = ckpt / f"rng-{accelerator.process_index}.pt"
    if not rng_file.exists():
        raise PhivisionError(
            f"{ckpt}: no RNG state for process {accelerator.process_index}; resume with the same number of processes"
        )
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
