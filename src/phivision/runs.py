"""Load a model for inference from whatever training produced: a RUN directory, a checkpoint, or a hub id.

Everything downstream of training (evaluate, predict, serve, export) calls :func:`load_model`, so a RUN made with
LoRA, QLoRA or full fine-tuning, an exported checkpoint and the untouched base model all load the same way and
come back with the processor and the prompt format they were trained with.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from phivision.answer.calibration import PriceCalibration, read_calibration
from phivision.answer.prompt import PromptFormat
from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError, first_line
from phivision.io import read_text_bounded
from phivision.labels import LabelSpace, read_labels
from phivision.loading import MERGE_TOLERANCE, load_adapter, load_pretrained, lossy_merge_note, merge_adapter
from phivision.model import Phi3VProcessor

# Written by `phivision export` beside the official files: the prompt the weights were trained with.
EXPORT_INFO_FILE = "phivision.json"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for generation, with the processor and prompt format that go with it."""

    model: Any  # Phi3VForCausalLM (or a PeftModel wrapping one when merge=False)
    processor: Any  # Phi3VProcessor
    prompt: PromptFormat
    source: str  # what was loaded, for logs and /healthz
    categories: tuple[str, ...] | None = None  # the training split's categories (None: not recorded)
    currency: str | None = None  # the catalog's currency, e.g. "USD" (None: not recorded)
    labels_path: str | None = None  # the file the categories were read from
    calibration: PriceCalibration | None = None  # price ranges (RUN/calibration.json; None: not calibrated)
    notes: tuple[str, ...] = ()  # how it was loaded where that was not as asked (a CLI prints them)
    max_images: int = 1  # photos per prompt the model was trained with (data.max_images)


@dataclass(frozen=True)
class RunInfo:
    """What a RUN directory holds, read from its config.yaml."""

    run_dir: Path
    base: str  # base checkpoint: a local directory or a hub id
    method: str  # "lora", "qlora" or "full"
    prompt: PromptFormat
    max_images: int = 1  # data.max_images: photos per prompt in training

    @property
    def adapter_dir(self) -> Path:
        return RunLayout(self.run_dir).adapter

    @property
    def model_dir(self) -> Path:
        return RunLayout(self.run_dir).model

    @property
    def processor_dir(self) -> Path:
        return RunLayout(self.run_dir).processor


def resolve_device(device: str | torch.device | None) -> torch.device:
    """cuda when available, else cpu; a ``--device`` torch does not know, or a CUDA device this machine does not
    have, is one line naming the flag."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise PhivisionError(f"--device {device!r}: not a device ({first_line(err)})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PhivisionError(f"--device {device}: no CUDA device is available on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise PhivisionError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def native_half_dtypes(device: torch.device) -> frozenset[torch.dtype]:
    """The 16-bit dtypes ``device`` computes natively, i.e. at least as fast as float32 (measured on the 4.2B
    model's linear layers: benchmarks/RESULTS.md, issue 16).

    CUDA: float16, and bfloat16 where the GPU has it (Ampere and later). x86 CPUs: bfloat16 with AVX512-BF16 or AMX
    (AMX also float16 with AMX-FP16); without them torch falls back to slow bf16 kernels (a matmul there is many
    times slower than float32). Arm CPUs: bfloat16 with the BF16 extension (oneDNN's check). Other devices: none.
    """
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return frozenset({torch.float16, torch.bfloat16} if bf16 else {torch.float16})
    if device.type != "cpu":
        return frozenset()
    cpu, arm = torch.cpu, platform.machine().lower() in ("aarch64", "arm64")
    x86_bf16 = _probe(getattr(cpu, "_is_avx512_bf16_supported", None)) or _probe(
        getattr(cpu, "_is_amx_tile_supported", None)
    )
    arm_bf16 = arm and _probe(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None))
    found = set()
    if x86_bf16 or arm_bf16:
        found.add(torch.bfloat16)
    if _probe(getattr(cpu, "_is_amx_fp16_supported", None)):
        found.add(torch.float16)
    return frozenset(found)


def _probe(check: Callable[[], bool] | None) -> bool:
    """A torch capability check, False where this torch lacks it."""
    try:
        return bool(check()) if check is not None else False
    except (RuntimeError, AttributeError):
        return False


def default_dtype(
    stored: torch.dtype, native: Collection[torch.dtype], device_type: str = "cpu"
) -> torch.dtype:
    """The checkpoint's own dtype where the device computes it natively; otherwise float32 on a CPU (a 16-bit
    dtype it emulates is slower than float32) and float16 on a GPU without bfloat16."""
    if stored == torch.float32 or stored in native:
        return stored
    if device_type == "cuda" and torch.float16 in native:
        return torch.float16
    return torch.float32


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, stored: torch.dtype | None = None
) -> torch.dtype:
    """``dtype`` as given; None: :func:`default_dtype` of ``stored`` (the checkpoint's dtype; None: float32)."""
    if dtype is None:
        return default_dtype(stored or torch.float32, native_half_dtypes(device), device.type)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise PhivisionError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def checkpoint_dtype(name: str | Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, as its config.json records it (``dtype``, or
    ``torch_dtype`` in files written by transformers 4); float32 when it records none."""
    local = Path(str(name)).expanduser() / "config.json"
    try:
        if local.is_file():
            config = json.loads(local.read_text(encoding="utf-8"))
        else:
            from transformers import PretrainedConfig

            config, _ = PretrainedConfig.get_config_dict(str(name))
    except (OSError, ValueError):
        return torch.float32  # unreadable: the loader itself reports it with the file's name
    stored = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return _DTYPES.get(str(stored).removeprefix("torch."), torch.float32)


def is_checkpoint_dir(path: Path) -> bool:
    """A directory whose config.json declares ``model_type: phi3_v`` (official files or an export)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(read_text_bounded(config)).get("model_type") == "phi3_v"
    except (ValueError, OSError, AttributeError):
        return False


def model_files(model: Any, depth: int = 3, most: int = 10_000) -> list[tuple[str, Path]]:
    """The files of a model directory (a RUN: config, weights, processor, checkpoints; or a checkpoint), down to
    ``depth`` levels and at most ``most`` of them, for :func:`phivision.io.refuse_overwriting_inputs`; nothing
    for a hub id or a loaded model."""
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_dir():
        return []
    root, found = Path(model), []
    for folder, dirs, files in os.walk(root):
        level = len(Path(folder).relative_to(root).parts)
        if level >= depth:
            dirs.clear()
        found += [
            (f"a file of --model ({Path(folder, f).relative_to(root)})", Path(folder, f)) for f in files
        ]
        if len(found) >= most:
            break
    return found


def read_run(run_dir: str | Path) -> RunInfo:
    """Read RUN/config.yaml: the base model, the method and the prompt format."""
    run_dir = Path(run_dir)
    config_path = RunLayout(run_dir).config
    try:
        config = yaml.safe_load(read_text_bounded(config_path))
    except OSError as err:
        raise PhivisionError(f"{config_path}: cannot read ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise PhivisionError(f"{config_path}: not valid YAML ({err})") from err
    if not isinstance(config, dict) or not config.get("model"):
        raise PhivisionError(f"{config_path}: field 'model' (the base checkpoint) is missing")
    method = str(config.get("method", "lora"))
    if method not in ("lora", "qlora", "full"):
        raise PhivisionError(f"{config_path}: field 'method': expected lora, qlora or full, got {method!r}")
    try:
        prompt = PromptFormat.from_dict(config.get("prompt"))
    except (ValueError, TypeError) as err:
        raise PhivisionError(f"{config_path}: field 'prompt': {err}") from err
    return RunInfo(
        run_dir=run_dir,
        base=_resolve_base(str(config["model"]), run_dir),
        method=method,
        prompt=prompt,
        max_images=_max_images(
            (config.get("data") or {}).get("max_images", 1), f"{config_path}: field 'data.max_images'"
        ),
    )


def _max_images(value: object, where: str) -> int:
    """A recorded ``max_images`` (photos per prompt): a whole number, at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PhivisionError(f"{where}: expected a whole number of photos, at least 1, got {value!r}")
    return value


def _resolve_base(base: str, run_dir: Path) -> str:
    """A relative base path is tried from the working directory, then from the RUN directory (so a RUN that was
    moved together with its base still loads); anything else is left to the hub."""
    path = Path(base).expanduser()
    if path.is_absolute() or path.exists():
        return str(path.resolve()) if path.exists() else str(path)
    beside = run_dir / path
    if beside.exists():
        return str(beside.resolve())
    return base


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _load_checkpoint(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    # strict: another model_type or a missing, unexpected or mis-shaped tensor is one error line
    return load_pretrained(name, dtype=dtype).to(device).eval()


def _load_processor(name: str | Path) -> Any:
    try:
        return Phi3VProcessor.from_pretrained(str(name))
    except OSError as err:
        raise PhivisionError(f"cannot load processor from {name}: {first_line(err)}") from err


def _export_info(path: Path) -> tuple[PromptFormat, LabelSpace, PriceCalibration | None, int]:
    """The prompt, label space, price calibration and photos per prompt an export records in phivision.json
    (defaults for a plain checkpoint)."""
    info_path = path / EXPORT_INFO_FILE
    if not info_path.is_file():
        return PromptFormat(), LabelSpace(), None, 1
    try:
        info = json.loads(read_text_bounded(info_path))
    except (ValueError, UnicodeDecodeError) as err:
        raise PhivisionError(f"{info_path}: not valid JSON ({err})") from err
    if not isinstance(info, dict):
        raise PhivisionError(f"{info_path}: expected a JSON object")
    try:
        prompt = PromptFormat.from_dict(info.get("prompt"))
    except (ValueError, TypeError, AttributeError) as err:
        raise PhivisionError(f"{info_path}: field 'prompt': {err}") from err
    try:
        labels = LabelSpace.from_dict(info["labels"]) if info.get("labels") is not None else LabelSpace()
    except (ValueError, TypeError) as err:
        raise PhivisionError(f"{info_path}: field 'labels': {err}") from err
    try:
        calibration = PriceCalibration.from_dict(info["calibration"]) if info.get("calibration") else None
    except (ValueError, TypeError) as err:
        raise PhivisionError(f"{info_path}: field 'calibration': {err}") from err
    max_images = _max_images(info.get("max_images", 1), f"{info_path}: field 'max_images'")
    return prompt, labels, calibration, max_images


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    merge: bool = True,
) -> LoadedModel:
    """Load a RUN directory, a checkpoint directory or a hub id for inference (eval mode, on ``device``).

    Args:
        path: RUN dir (config.yaml + adapter/ or model/), a directory with a ``phi3_v`` config.json, or a hub id.
        device: default cuda if available, else cpu.
        dtype: default: the dtype the weights are stored in (bfloat16 for the official model) where the device
            computes it natively, else float32 (see :func:`native_half_dtypes` and :func:`default_dtype`).
        merge: fold a LoRA adapter into the base weights (faster generation); False keeps the PeftModel. Where
            rounding the merged weights to ``dtype`` loses more than 1% of the adapter's update (a short run's
            update in bfloat16), ``LoadedModel.notes`` says so.
    """
    device = resolve_device(device)
    if dtype is not None:
        dtype = resolve_dtype(dtype, device)  # a bad name fails before anything is read
    local = Path(str(path)).expanduser()

    if local.is_dir() and RunLayout(local).is_run():
        run = read_run(local)
        weights = run.model_dir if run.model_dir.is_dir() else run.base
        return _load_run(run, device, resolve_dtype(dtype, device, checkpoint_dtype(weights)), merge)
    if local.is_dir() and is_checkpoint_dir(local):
        prompt, labels, calibration, max_images = _export_info(local)
        model = _load_checkpoint(str(local), device, resolve_dtype(dtype, device, checkpoint_dtype(local)))
        labels_path = str(local / EXPORT_INFO_FILE) if labels.categories else None
        return LoadedModel(
            model,
            _load_processor(local),
            prompt,
            str(local),
            labels.categories,
            labels.currency,
            labels_path,
            calibration,
            max_images=max_images,
        )
    if local.exists():
        raise PhivisionError(
            f"{path}: neither a training run (config.yaml with adapter/ or model/) "
            "nor a checkpoint (config.json with model_type phi3_v)"
        )
    if not _looks_like_hub_id(str(path)):
        raise PhivisionError(
            f"{path}: no such directory (and not a hub id like 'microsoft/Phi-3-vision-128k-instruct')"
        )
    model = _load_checkpoint(str(path), device, resolve_dtype(dtype, device, checkpoint_dtype(path)))
    return LoadedModel(model, _load_processor(str(path)), PromptFormat(), source=str(path))


def _load_run(run: RunInfo, device: torch.device, dtype: torch.dtype, merge: bool) -> LoadedModel:
    processor_dir = run.processor_dir if run.processor_dir.is_dir() else None
    labels = read_labels(run.run_dir)
    recorded = {
        "categories": labels.categories,
        "currency": labels.currency,
        "labels_path": str(RunLayout(run.run_dir).labels) if labels.categories else None,
        "calibration": read_calibration(run.run_dir),
        "max_images": run.max_images,
    }
    if run.model_dir.is_dir():  # full fine-tuning saved the whole model
        model = _load_checkpoint(str(run.model_dir), device, dtype)
        processor = _load_processor(processor_dir or run.model_dir)
        source = f"{run.run_dir} (full fine-tune)"
        return LoadedModel(model, processor, run.prompt, source, **recorded)

    # QLoRA adapters are applied to the unquantized base: merging into 4-bit weights would lose the update.
    base = _load_checkpoint(run.base, device, dtype)
    # every LoRA tensor present with its shape, nothing else; the adapter stays float32 (PEFT upcasts it)
    model = load_adapter(base, run.adapter_dir).to(device).eval()
    notes: tuple[str, ...] = ()
    if merge:
        model, report = merge_adapter(model, dtype)
        if report.relative_error > MERGE_TOLERANCE:
            notes = (lossy_merge_note(report, "--dtype float32 keeps it"),)
    processor = _load_processor(processor_dir or run.base)
    source = f"{run.run_dir} ({run.method} on {run.base})"
    return LoadedModel(model, processor, run.prompt, source, **recorded, notes=notes)
