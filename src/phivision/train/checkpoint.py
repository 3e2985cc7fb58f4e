"""Checkpoints: the loadable weights plus everything needed to continue a run exactly, as tensors and JSON.

``checkpoints/step-N/`` holds

* ``adapter/`` or ``model/``: the weights at step N (PEFT adapter or ``save_pretrained``, safetensors);
* ``best/``: the run's best weights so far (what ``RUN/adapter`` or ``RUN/model`` held at step N), absent before
  the first evaluation, so a resumed run still ends with the best weights of the whole run;
* ``optimizer.safetensors`` + ``optimizer.json`` (one process, DDP), or ``engine/`` (FSDP: accelerate's
  per-rank state files; DeepSpeed: the engine's own checkpoint, which holds the sharded optimizer);
* ``scheduler.json``, ``scaler.json`` (fp16), ``rng-<rank>.safetensors`` + ``rng-<rank>.json`` and
  ``trainer_state.json``.

Nothing phivision writes is a pickle, and restoring never unpickles: tensors come from safetensors, the rest
from JSON, and any ``torch.load`` a library makes while restoring (accelerate's FSDP loader, DeepSpeed) runs
with ``weights_only`` forced on. A checkpoint is built in ``.step-N.tmp/`` and renamed into place when
complete, so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError, first_line
from phivision.io import atomic_write_json
from phivision.loading import check_tensors

_STEP_DIR = re.compile(r"^step-(\d+)$")
BEST_DIR = "best"
ENGINE_DIR = "engine"


def weights_dirname(method: str) -> str:
    return RunLayout.MODEL if method == "full" else RunLayout.ADAPTER


# ------------------------------------------------------------------------------------ directories


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


def _link_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` as hard links where possible: weight files are never modified in place (a new
    version is a new directory renamed over the old), so sharing their inodes is safe and costs no disk."""

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(src, dst, copy_function=link)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories never match ``step-N``)."""
    root = RunLayout(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


# ------------------------------------------------------------------------ tensors + JSON, no pickle


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` as JSON, each tensor replaced by a reference into ``tensors`` (saved as safetensors)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}  # fmt: skip
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint holds tensors and plain data only, not {type(obj).__name__} (at {path})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(obj: Any, stem: Path) -> None:
    """Write nested dicts/lists/tuples of tensors and plain values as ``stem.json`` (+ ``stem.safetensors``)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    data = _encode(obj, tensors, "t")
    if tensors:
        save_file(tensors, str(stem.with_suffix(".safetensors")))
    atomic_write_json(stem.with_suffix(".json"), data)


def load_tree(stem: Path) -> Any:
    """Read what :func:`save_tree` wrote; a missing or unreadable file is a one-line error."""
    from safetensors.torch import load_file

    json_file, tensor_file = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    try:
        data = json.loads(json_file.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
        return _decode(data, tensors)
    except FileNotFoundError:
        raise PhivisionError(f"{json_file}: missing from the checkpoint") from None
    except (OSError, ValueError, KeyError, TypeError) as err:  # safetensors raises its own errors as well
        raise PhivisionError(f"{stem}: not a readable checkpoint file ({first_line(err)})") from None
    except Exception as err:  # noqa: BLE001  (safetensors' SafetensorError is not an OSError)
        raise PhivisionError(f"{tensor_file}: not a readable safetensors file ({err})") from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``torch.load`` to ``weights_only=True`` for any library restoring state inside the block (torch
    reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at every call), so a planted pickle never runs."""
    saved = {
        k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states of this process, as plain values and tensors."""
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


# ------------------------------------------------------------------------------------ weights


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
    """Load weights saved by :func:`save_weights` back into the live (possibly PEFT-wrapped) model; every tensor
    must be there with its shape, and nothing else (else one line naming the tensors)."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise PhivisionError(f"{src}: no .safetensors weights in this checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as err:  # noqa: BLE001  (SafetensorError)
            raise PhivisionError(f"{file}: not a readable safetensors file ({err})") from None
    if method == "full":
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_tensors(src, expected, {k: tuple(v.shape) for k, v in state.items()})
        model.load_state_dict(state, strict=True)
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    check_tensors(src, expected, {k: tuple(v.shape) for k, v in state.items()})
    set_peft_model_state_dict(model, state)


# ------------------------------------------------------------------------------------------ save


def _engine(accelerator: Any) -> str:
    """``fsdp``, ``deepspeed`` or ``plain`` (one process or DDP: every rank holds the whole optimizer)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "plain"


def _save_engine_state(accelerator: Any, model: Any, optimizer: Any, folder: Path) -> None:
    """FSDP and DeepSpeed shard the optimizer (and ZeRO-3/FSDP the weights): every rank saves its part with
    accelerate's FSDP savers (per-rank files, no DCP pickle metadata) or the DeepSpeed engine."""
    if _engine(accelerator) == "fsdp":
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        save_fsdp_model(plugin, accelerator, model, str(folder), use_dcp=False)
        save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder), use_dcp=False)
    else:
        model.save_checkpoint(str(folder), tag="state")


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
    final = RunLayout(run_dir).checkpoint(step)
    tmp = final.with_name(f".{final.name}.tmp")
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_tree(rng_state(), tmp / f"rng-{rank}")
    save_weights(accelerator, model, tmp / weights_dirname(method))
    if _engine(accelerator) != "plain":
        (tmp / ENGINE_DIR).mkdir(exist_ok=True)
        accelerator.wait_for_everyone()
        _save_engine_state(accelerator, model, optimizer, tmp / ENGINE_DIR)
    if is_main:
        if _engine(accelerator) == "plain":
            save_tree(optimizer.state_dict(), tmp / "optimizer")
        save_tree(scheduler.state_dict(), tmp / "scheduler")
        if accelerator.scaler is not None:
            save_tree(accelerator.scaler.state_dict(), tmp / "scaler")
        best = run_dir / weights_dirname(method)
        if state.get("best_step") is not None and best.is_dir():
            _link_tree(best, tmp / BEST_DIR)
        atomic_write_json(tmp / RunLayout.TRAINER_STATE, state)
    accelerator.wait_for_everyone()
    if is_main:
        replace_dir(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------ load


def _read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / RunLayout.TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PhivisionError(f"{path}: missing from the checkpoint") from None
    except (OSError, ValueError) as err:
        raise PhivisionError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise PhivisionError(f"{path}: no integer 'step'; not a phivision checkpoint")
    return state


def _load_engine_state(accelerator: Any, model: Any, optimizer: Any, folder: Path) -> None:
    if not folder.is_dir():
        raise PhivisionError(f"{folder}: missing; was this checkpoint written by another engine?")
    if _engine(accelerator) == "fsdp":
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        load_fsdp_model(plugin, accelerator, model, str(folder), use_dcp=False)
        load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder), use_dcp=False)
    else:
        loaded, _ = model.load_checkpoint(str(folder), tag="state")
        if loaded is None:
            raise PhivisionError(f"{folder}: DeepSpeed found no checkpoint to load")


def restore_best(ckpt: Path, run_dir: Path, method: str) -> None:
    """Make ``RUN/adapter`` (``RUN/model``) the checkpoint's best weights, or remove it when the checkpoint
    predates every evaluation: weights from evaluations after the checkpoint belong to the lost steps."""
    final = run_dir / weights_dirname(method)
    best = ckpt / BEST_DIR
    if best.is_dir():
        tmp = final.with_name(f".{final.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        _link_tree(best, tmp)
        replace_dir(tmp, final)
    elif final.exists():
        shutil.rmtree(final)


def load_checkpoint(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ckpt: Path,
    method: str,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, gradient scaler and this rank's RNG (and, on the main process,
    the run's best weights); returns the saved trainer state. Never unpickles anything."""
    state = _read_state(ckpt)
    rng_stem = ckpt / f"rng-{accelerator.process_index}"
    if not rng_stem.with_suffix(".json").exists() and any(ckpt.glob("*.pt")):
        raise PhivisionError(
            f"{ckpt}: holds pickled state (*.pt) from an older phivision, which is never unpickled; "
            f"its weights are in {weights_dirname(method)}/, but the run cannot be resumed from it"
        )
    if not rng_stem.with_suffix(".json").exists():
        raise PhivisionError(
            f"{ckpt}: no RNG state for process {accelerator.process_index}; resume with the same number of processes"
        )
    with weights_only_loads():
        if _engine(accelerator) == "plain":
            load_weights(accelerator.unwrap_model(model), ckpt / weights_dirname(method), method)
            _load_optimizer(optimizer, ckpt)
        else:
            try:
                _load_engine_state(accelerator, model, optimizer, ckpt / ENGINE_DIR)
            except pickle.UnpicklingError as err:  # an object beyond tensors and plain data: never unpickled
                raise PhivisionError(
                    f"{ckpt / ENGINE_DIR}: refused to unpickle ({first_line(err)})"
                ) from None
    scheduler.load_state_dict(load_tree(ckpt / "scheduler"))
    if accelerator.scaler is not None:
        if not (ckpt / "scaler.json").exists():
            raise PhivisionError(
                f"{ckpt}: no gradient scaler state (was the run trained with another precision?)"
            )
        accelerator.scaler.load_state_dict(load_tree(ckpt / "scaler"))
    set_rng_state(load_tree(rng_stem))
    if accelerator.is_main_process:
        restore_best(ckpt, ckpt.parent.parent, method)  # RUN/checkpoints/step-N -> RUN
    accelerator.wait_for_everyone()
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """AdamW's state, checked against the live parameters (a mis-shaped moment would fail steps later)."""
    saved = load_tree(ckpt / "optimizer")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = saved.get("state", {}) if isinstance(saved, dict) else {}
    bad = [
        f"parameter {i} {name} {tuple(value.shape)} vs {tuple(params[i].shape)}"
        for i, entry in moments.items()
        if isinstance(i, int) and i < len(params)
        for name, value in entry.items()
        if isinstance(value, torch.Tensor) and value.ndim and value.shape != params[i].shape
    ]
    if bad:
        raise PhivisionError(
            f"{ckpt / 'optimizer.safetensors'}: mis-shaped optimizer state: {', '.join(bad[:3])}"
        )
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise PhivisionError(
            f"{ckpt / 'optimizer.json'}: does not fit this run's optimizer ({first_line(err)})"
        ) from None
