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
import math
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
from phivision.io import WriteError, atomic_write_json, disk_errors, read_text_bounded
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
        data = json.loads(read_text_bounded(json_file))
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
        try:
            with disk_errors(out):
                accelerator.unwrap_model(model).save_pretrained(
                    str(tmp), state_dict=state_dict, safe_serialization=True
                )
                replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
    """Write ``checkpoints/step-N`` atomically from all ranks (each saves its RNG state), then prune old ones.

    A full disk is one :class:`~phivision.io.WriteError` naming the checkpoint; the partial ``.step-N.tmp`` is
    removed and the previous checkpoints stay as they were, so ``--resume`` continues from the last one."""
    step = state["step"]
    final = RunLayout(run_dir).checkpoint(step)
    tmp = final.with_name(f".{final.name}.tmp")
    is_main = accelerator.is_main_process
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with disk_errors(final):
            _fill_checkpoint(accelerator, model, optimizer, scheduler, state, tmp, run_dir, method)
            if is_main:
                replace_dir(tmp, final)
    except BaseException as err:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, WriteError):  # name the checkpoint, not a file of the removed temporary folder
            raise err.at(final) from None
        raise
    if is_main:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fill_checkpoint(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tmp: Path,
    run_dir: Path,
    method: str,
) -> None:
    is_main, rank = accelerator.is_main_process, accelerator.process_index
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


# ------------------------------------------------------------------------------------------ load


def _read_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json``, every field of the type the trainer wrote, its step the one in the folder name."""
    path = ckpt / RunLayout.TRAINER_STATE
    try:
        state = json.loads(read_text_bounded(path))
    except FileNotFoundError:
        raise PhivisionError(f"{path}: missing from the checkpoint") from None
    except (OSError, ValueError) as err:
        raise PhivisionError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(state, dict) or not _is_count(state.get("step")):
        raise PhivisionError(f"{path}: no whole-number 'step' >= 0; not a phivision checkpoint")
    problem = _state_problem(state)
    if problem:
        raise PhivisionError(f"{path}: {problem}; the checkpoint was damaged or edited")
    named = _STEP_DIR.match(ckpt.name)
    if named and int(named.group(1)) != state["step"]:
        raise PhivisionError(
            f"{ckpt}: named step {named.group(1)} but holds step {state['step']}; rename or remove the folder"
        )
    return state


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:  # NaN included: an evaluation over no answers scores NaN
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a trainer state read from disk (the fields of ``TrainerState``), or None."""
    checks = {
        "total_steps": _is_count,
        "metric": lambda v: isinstance(v, str) and bool(v),
        "best_metric": lambda v: v is None or _is_number(v),
        "best_step": lambda v: v is None or (_is_count(v) and v <= state["step"]),
        "evals_without_improvement": _is_count,
        "history": lambda v: isinstance(v, list) and all(_is_eval_record(r, state["step"]) for r in v),
        "tracker_run_id": lambda v: v is None or isinstance(v, str),
        "done": lambda v: isinstance(v, bool),
        "stopped_early": lambda v: isinstance(v, bool),
    }
    for key, valid in checks.items():
        if key in state and not valid(state[key]):
            return f"field '{key}' holds {json.dumps(state[key])[:60]}, not what training writes there"
    if state.get("total_steps") is not None and state["step"] > state["total_steps"]:
        return f"step {state['step']} is past the run's {state['total_steps']} steps"
    return None


def _is_eval_record(record: Any, step: int) -> bool:
    return (
        isinstance(record, dict)
        and _is_count(record.get("step"))
        and record["step"] <= step
        and all(v is None or _is_number(v) for k, v in record.items() if k not in ("type", "step"))
    )


def check_like(saved: Any, live: Any, where: str) -> None:
    """``saved`` (read from a checkpoint) has the structure of ``live`` (this run's own state object): the same
    keys (those both have), lengths and kinds of value, every number finite, every tensor of the same shape and
    kind. A damaged or edited file stops here with one line naming the key, not steps later inside torch."""

    def fail(what: str) -> None:
        raise PhivisionError(f"{where}: {what}; the checkpoint was damaged or edited")

    if isinstance(live, dict):
        if not isinstance(saved, dict):
            fail(f"expected a mapping, found {type(saved).__name__}")
        for key in live.keys() & saved.keys():
            check_like(saved[key], live[key], f"{where} key {key!r}")
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            fail(f"expected a list of {len(live)}, found {json.dumps(saved, default=str)[:60]}")
        for i, (a, b) in enumerate(zip(saved, live, strict=True)):
            check_like(a, b, f"{where}[{i}]")
    elif isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != live.shape:
            fail(f"expected a tensor of shape {tuple(live.shape)}")
        if saved.is_floating_point() != live.is_floating_point() or (
            saved.is_floating_point() and not bool(torch.isfinite(saved).all())
        ):
            fail("a tensor of another kind, or with non-finite values")
    elif isinstance(live, bool) or live is None or isinstance(live, str):
        if type(saved) is not type(live):
            fail(f"expected {type(live).__name__}, found {json.dumps(saved, default=str)[:60]}")
    elif isinstance(live, int):
        if not (isinstance(saved, int) and not isinstance(saved, bool)):
            fail(f"expected a whole number, found {json.dumps(saved, default=str)[:60]}")
    elif isinstance(live, float) and not _is_finite(saved):
        fail(f"expected a finite number, found {json.dumps(saved, default=str)[:60]}")


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
    saved_schedule = load_tree(ckpt / "scheduler")
    check_like(saved_schedule, scheduler.state_dict(), str(ckpt / "scheduler.json"))
    scheduler.load_state_dict(saved_schedule)
    if accelerator.scaler is not None:
        if not (ckpt / "scaler.json").exists():
            raise PhivisionError(
                f"{ckpt}: no gradient scaler state (was the run trained with another precision?)"
            )
        accelerator.scaler.load_state_dict(load_tree(ckpt / "scaler"))
    try:
        set_rng_state(load_tree(rng_stem))
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as err:
        raise PhivisionError(
            f"{rng_stem.with_suffix('.json')}: not a random generator state ({first_line(err)}); the checkpoint "
            "was damaged or edited"
        ) from None
    if accelerator.is_main_process:
        restore_best(ckpt, ckpt.parent.parent, method)  # RUN/checkpoints/step-N -> RUN
    accelerator.wait_for_everyone()
    return state


ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """AdamW's state, checked against the live optimizer: hyperparameters of the same kinds and in range,
    moments of the parameters' shapes, finite, second moments >= 0 (a bad value would fail, or turn the loss
    into NaN, steps later)."""
    saved = load_tree(ckpt / "optimizer")
    where = ckpt / "optimizer.json"
    live = optimizer.state_dict()
    check_like(saved, {"param_groups": live["param_groups"]}, str(where))
    if not isinstance(saved.get("state", {}), dict):
        raise PhivisionError(f"{where}: key 'state' is not a mapping; the checkpoint was damaged or edited")
    for group in saved["param_groups"]:
        bad = _hyperparameter_problem(group)
        if bad:
            raise PhivisionError(f"{where}: {bad}; the checkpoint was damaged or edited")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, entry in saved.get("state", {}).items():
        problem = _moment_problem(i, entry, params)
        if problem:
            raise PhivisionError(f"{ckpt / 'optimizer.safetensors'}: {problem}")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise PhivisionError(f"{where}: does not fit this run's optimizer ({first_line(err)})") from None


def _hyperparameter_problem(group: dict[str, Any]) -> str | None:
    ranges = {
        "lr": lambda v: v >= 0,
        "initial_lr": lambda v: v >= 0,
        "eps": lambda v: v > 0,
        "weight_decay": lambda v: v >= 0,
        "betas": lambda v: all(0 <= b < 1 for b in v),
    }
    for key, valid in ranges.items():
        if key in group and not valid(group[key]):
            return f"param_groups key {key!r} is {group[key]}, out of range"
    return None


def _moment_problem(index: Any, entry: Any, params: list[torch.Tensor]) -> str | None:
    """Why one parameter's saved AdamW state cannot be used, or None."""
    if not (_is_count(index) and index < len(params)) or not isinstance(entry, dict):
        return f"state for parameter {index!r}: not one of this run's {len(params)} parameters"
    for name, value in entry.items():
        if name != "step" and name not in ADAMW_MOMENTS:
            return f"parameter {index}: unknown state {name!r}"
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return f"parameter {index} {name}: not a floating-point tensor"
        if name != "step" and value.shape != params[index].shape:
            return f"mis-shaped optimizer state: parameter {index} {name} {tuple(value.shape)} vs {tuple(params[index].shape)}"
        if name == "step" and value.numel() != 1:
            return f"mis-shaped optimizer state: parameter {index} step {tuple(value.shape)} is not a scalar"
        if not bool(torch.isfinite(value).all()) or (name != "exp_avg" and bool((value < 0).any())):
            return f"parameter {index} {name}: holds non-finite or negative values"
    return None
