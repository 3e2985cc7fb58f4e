"""`phivision export`: turn a training RUN into a standalone checkpoint in the official Phi-3-Vision layout.

LoRA/QLoRA adapters are merged into the base weights; full fine-tunes are re-saved. The result has the files and
tensor names of ``microsoft/Phi-3-vision-128k-instruct`` plus phivision's own model code beside the weights
(``config.json: auto_map``), whatever the base was (a local official checkpoint, a hub id, a tiny checkpoint, a
full fine-tune): phivision, plain transformers with ``trust_remote_code=True`` (phivision not installed) and
vLLM's native ``Phi3VForCausalLM`` can all load it. The RUN itself is left untouched: its adapter stays loadable
with PEFT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from phivision.answer.calibration import read_calibration
from phivision.args import MAX_SHARD_SIZE
from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError
from phivision.io import atomic_directory, atomic_write_json, require_empty_dir
from phivision.labels import read_labels
from phivision.loading import MERGE_TOLERANCE, lossy_merge_note, merge_adapter
from phivision.model import save_checkpoint  # importing phivision.model registers phi3_v with AutoConfig
from phivision.runs import EXPORT_INFO_FILE, RunInfo, checkpoint_dtype, load_model, read_run, resolve_dtype


def export_run(
    run: str | Path,
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    device: str | None = "cpu",
) -> Path:
    """Merge (or re-save) a RUN into ``out``; written to a sibling temporary directory and moved into place whole.

    The base weights are loaded once, directly in the output dtype, and the LoRA update is merged layer by layer
    (:func:`phivision.loading.merge_adapter`: each merged weight computed in float32 and rounded once), so the
    export needs about the size of the exported weights in memory plus one layer, and a bfloat16 export is
    exactly the float32 merge rounded to bfloat16. How much of the update the rounding kept is measured and
    recorded in ``phivision.json`` (``merge``); where it lost more than 1%, a warning says so and how to keep it
    (``dtype="float32"``: exact, twice the size).

    Args:
        run: a training RUN directory.
        out: directory to create; it must not exist or be empty.
        dtype: dtype of the saved weights; default: the base checkpoint's own (bf16 for the official model).
        max_shard_size: safetensors shard bound, e.g. "5GB" (the official layout: two files for the 4.2B model).
        device: where to merge (cpu: about 2 bytes per parameter for a bf16 export, 8.3 GB for the 4.2B model).
    """
    run_dir, out = Path(run), Path(out)
    if not run_dir.is_dir() or not RunLayout(run_dir).is_run():
        raise PhivisionError(f"--run {run_dir}: not a training run (config.yaml with adapter/ or model/)")
    require_empty_dir(out)  # before the merge; atomic_directory checks again at the end
    info = read_run(run_dir)
    weights_from = info.model_dir if info.model_dir.is_dir() else info.base
    target_dtype = (
        resolve_dtype(dtype, torch.device("cpu")) if dtype is not None else checkpoint_dtype(weights_from)
    )

    loaded = load_model(run_dir, device=device, dtype=target_dtype, merge=False)
    model, merge = loaded.model, None
    if info.model_dir.is_dir():
        model = model.to(dtype=target_dtype)
    else:
        model, merge = merge_adapter(model, target_dtype)
        if merge.relative_error > MERGE_TOLERANCE:
            remedy = "export with --dtype float32 to keep it exactly (twice the size)"
            print(f"warning: {lossy_merge_note(merge, remedy)}", file=sys.stderr)
    # The official generation_config stops on </s> only, which Phi-3-V never emits at the end of a turn.
    model.generation_config.eos_token_id = [int(t) for t in loaded.processor.stop_token_ids]
    model.generation_config.pad_token_id = loaded.processor.pad_token_id

    with atomic_directory(out) as tmp:
        save_checkpoint(model, loaded.processor, tmp, max_shard_size=max_shard_size)
        record = export_info(info, run_dir)
        if merge is not None:
            record["merge"] = merge.to_dict()
        atomic_write_json(tmp / EXPORT_INFO_FILE, record)
        _default_permissions(tmp)
    return out


def export_info(info: RunInfo, run_dir: Path) -> dict[str, Any]:
    """``phivision.json``: what :func:`phivision.runs.load_model` reads back (the prompt) and where it came from."""
    return {
        "prompt": info.prompt.to_dict(),
        "labels": read_labels(run_dir).to_dict(),  # categories and currency, for constrained answers
        "calibration": calibration.to_dict() if (calibration := read_calibration(run_dir)) else None,
        "max_images": info.max_images,  # photos per prompt in training: evaluate, predict and serve use as many
        "run": str(run_dir.resolve()),
        "base": info.base,
        "method": info.method,
    }


def _default_permissions(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only files; an export is meant to be read by other users (e.g. a server)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)
