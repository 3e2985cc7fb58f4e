"""Stand-in checkpoints: the real checkpoint's files with random weights, shaped exactly like the download.

``/work/shared/reference/phi-3-vision-128k-instruct`` (or any folder with the same small files) holds the real
``config.json``, tokenizer, ``preprocessor_config.json`` and ``model.safetensors.index.json`` but no weights.
:func:`write_standin_checkpoint` adds random weights: at full size (4,146,621,440 parameters) in the real shard
layout (the same two file names, every tensor in the shard the index names), or shrunk by ``overrides`` (a few
decoder layers, a few CLIP layers) with the real tokenizer, vocabulary and CLIP geometry kept. The weights are
streamed into the safetensors files one tensor at a time, so writing the full-size model needs well under 1 GB of
memory; every tensor is drawn from its own generator seeded by ``(seed, name)``, so a tensor's values do not
depend on the other tensors or on the order they are written in.

phivision-only (like ``tiny.py``): it does not ship inside exports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from phivision.errors import PhivisionError
from phivision.io import atomic_directory, require_empty_dir
from phivision.model.configuration_phi3_v import Phi3VConfig
from phivision.model.modeling_phi3_v import Phi3VForCausalLM

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# The small files of the download that are copied as they are (those present in the reference folder).
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "LICENSE",
)
OFFICIAL_CODE_DIR = "official-code"
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def standin_config(reference: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """The reference's ``config.json`` with ``overrides`` applied.

    Top-level keys replace config fields (``num_hidden_layers=2``, ``hidden_size=256``, ...); ``vision={...}``
    updates the CLIP tower (written as ``img_processor["vision_config"]``, e.g. ``{"num_hidden_layers": 4}``)
    and ``layer_idx=-2`` sets ``img_processor["layer_idx"]`` (vLLM builds ``24 + layer_idx + 1`` CLIP layers).
    """
    path = Path(reference) / CONFIG_FILE
    if not path.is_file():
        raise PhivisionError(f"{path}: not found (a stand-in needs the reference checkpoint's config.json)")
    config = json.loads(path.read_text(encoding="utf-8"))
    vision = overrides.pop("vision", None)
    layer_idx = overrides.pop("layer_idx", None)
    known = set(Phi3VConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise PhivisionError(f"stand-in checkpoint: unknown config override(s) {', '.join(unknown)}")
    config.update(overrides)
    img_processor = dict(config.get("img_processor", {}))
    if vision:
        img_processor["vision_config"] = {**img_processor.get("vision_config", {}), **vision}
        if "hidden_size" in vision:
            img_processor["image_dim_out"] = vision["hidden_size"]
    if layer_idx is not None:
        img_processor["layer_idx"] = int(layer_idx)
    config["img_processor"] = img_processor
    _fit_rope_factors(config)
    return config


def _fit_rope_factors(config: dict[str, Any]) -> None:
    """LongRoPE has one factor per rotary frequency (head_dim / 2; 48 for the real 3072 / 32 heads): a shrunk
    model with another head size gets the real lists resampled to its length (linear interpolation)."""
    rope = config.get("rope_scaling")
    if not rope:
        return
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    for key in ("long_factor", "short_factor"):
        factors = [float(f) for f in rope[key]]
        if len(factors) != half:
            positions = [i * (len(factors) - 1) / max(half - 1, 1) for i in range(half)]
            rope[key] = [_interpolate(factors, p) for p in positions]
    config["rope_scaling"] = rope


def _interpolate(values: list[float], position: float) -> float:
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: independent of every other tensor and of the writing order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float
) -> torch.Tensor:
    """A norm's weight is ones and every bias zeros (a 1-D ``*.weight`` or ``*.bias``); every other tensor
    (matrices, embeddings, CLIP's class embedding, the separators glb_GN/sub_GN) is normal(0, std)."""
    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def model_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor the model saves (state-dict order) with its shape, from a model built on the meta device."""
    with torch.device("meta"):
        model = Phi3VForCausalLM(Phi3VConfig(**config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def plan_shards(
    shapes: dict[str, tuple[int, ...]], index: dict[str, str] | None, max_shard_bytes: int, itemsize: int
) -> dict[str, list[str]]:
    """File name -> tensor names. With ``index`` (the reference's weight map) every tensor goes where the real
    download has it (the names must be exactly the index's); else tensors fill shards of at most
    ``max_shard_bytes`` in state-dict order, one ``model.safetensors`` when they all fit."""
    if index is not None:
        if set(index) != set(shapes):
            missing, extra = sorted(set(index) - set(shapes)), sorted(set(shapes) - set(index))
            raise PhivisionError(
                f"the model's tensors differ from the reference index: {len(missing)} only in the index "
                f"({', '.join(missing[:3])}...), {len(extra)} only in the model ({', '.join(extra[:3])}...)"
            )
        files: dict[str, list[str]] = {}
        for name in shapes:
            files.setdefault(index[name], []).append(name)
        return dict(sorted(files.items()))
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * _numel(shape)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    total = len(groups)
    return {f"model-{i + 1:05d}-of-{total:05d}.safetensors": names for i, names in enumerate(groups)}


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def stream_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
) -> int:
    """Write a safetensors file tensor by tensor: the header (known from the shapes) first, then each tensor's
    bytes as ``make`` produces it, so at most one tensor is in memory. Returns the bytes of tensor data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + itemsize * _numel(shape)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape in shapes.items():
            tensor = make(name, shape)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}"
                )
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return offset


def write_standin_checkpoint(
    out: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float | None = None,
    num_crops: int | None = None,
    official_code: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Path:
    """Write a stand-in of the reference checkpoint to ``out`` (which must not exist or be empty).

    Args:
        out: the checkpoint directory, written whole or not at all.
        reference: a folder with the real checkpoint's small files (config, tokenizer, preprocessor, and for
            the real shard layout ``model.safetensors.index.json``).
        dtype: the weights' dtype (the download's is bfloat16).
        seed: seeds every tensor (same seed, same weights).
        std: the normal init's standard deviation (default: the config's ``initializer_range``).
        num_crops: rewrite ``preprocessor_config.json``'s num_crops (default: the reference's).
        official_code: also copy the reference's ``official-code/*.py`` beside the weights, as the download
            has them (for the official code run as an oracle; phivision never imports them).
        max_shard_bytes: shard size when the real index does not apply (with ``overrides``).
        progress: called with a line per file written.
        overrides: config changes, see :func:`standin_config`; with none, the real index's shard layout is used.

    Returns:
        The checkpoint directory.
    """
    reference = Path(reference)
    require_empty_dir(out)
    config = standin_config(reference, **dict(overrides))
    config["torch_dtype"] = _DTYPE_NAMES[dtype]
    shapes = model_tensor_shapes(config)
    index_path = reference / INDEX_FILE
    index = None
    if not overrides and index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(shapes, index, max_shard_bytes, itemsize)
    init_std = float(config.get("initializer_range", 0.02) if std is None else std)

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return random_tensor(name, shape, dtype, seed, init_std)

    with atomic_directory(out) as tmp:
        total = 0
        for file_name, names in shards.items():
            total += stream_safetensors(tmp / file_name, {n: shapes[n] for n in names}, dtype, make)
            if progress:
                progress(f"wrote {file_name} ({len(names)} tensors)")
        if len(shards) > 1:
            weight_map = {name: file_name for file_name, names in shards.items() for name in names}
            index_out = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index_out, indent=2) + "\n", encoding="utf-8")
        if overrides or dtype != torch.bfloat16:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(reference / CONFIG_FILE, tmp / CONFIG_FILE)  # the real file, byte for byte
        for name in COPIED_FILES:
            if (reference / name).is_file():
                shutil.copyfile(reference / name, tmp / name)
        if num_crops is not None:
            path = tmp / "preprocessor_config.json"
            processor_config = json.loads(path.read_text(encoding="utf-8"))
            processor_config["num_crops"] = int(num_crops)
            path.write_text(json.dumps(processor_config, indent=2) + "\n", encoding="utf-8")
        if official_code:
            for source in sorted((reference / OFFICIAL_CODE_DIR).glob("*.py")):
                shutil.copyfile(source, tmp / source.name)
    return Path(out)
