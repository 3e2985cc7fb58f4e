"""A full-size export served by plain transformers: export, reload WITHOUT phivision, time greedy generation.

    python benchmarks/gpu_export_generate.py                                   # GPU: full size, bf16, SDPA
    python benchmarks/gpu_export_generate.py --size tiny --device cpu --dtype fp32 --images 4 --batch-sizes 1,2

Steps, each printed with its time:

1. Build the official Phi-3-Vision-128K-Instruct architecture (``tests/model/data``'s config.json, 4.15 B
   parameters) with random weights, and save it as a full fine-tuning RUN (``RUN/model``, ``RUN/processor``,
   ``RUN/config.yaml``), as ``phivision train --method full`` leaves it.
2. ``phivision.serve.export.export_run``: the standalone checkpoint (weights in the run's dtype, the model code and
   its ``auto_map``), copied into a fresh directory.
3. A child process in which ``import phivision`` is blocked loads the copy with
   ``AutoModelForCausalLM/AutoProcessor.from_pretrained(..., trust_remote_code=True)`` (the export's own code, a
   fresh ``HF_MODULES_CACHE``), then times greedy generation at each ``--batch-sizes`` (left-padded batches from
   the processor, KV cache, every answer forced to ``--max-new-tokens`` tokens because random weights stop
   anywhere) after one untimed warm-up batch, and prints images/s.

The tokenizer is phivision's tiny one (the real one cannot be fetched offline); its ids lie inside the official
vocabulary and an image at 16 crops is ~2,000 of the ~2,030 prompt tokens, so timings match the real tokenizer's.
Constrained decoding is not timed here: no constrained-generation API existed on main when this was written.
"""

from __future__ import annotations

import argparse
import importlib.abc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DTYPES = ("bf16", "fp32")


# ------------------------------------------------------------------------------------------ parent: export


def write_full_run(run: Path, size: str, dtype: str, device: str, num_crops: int) -> None:
    """A random-init model saved in the layout of a full fine-tuning RUN."""
    import torch
    import yaml
    from bench_model import DTYPES as TORCH_DTYPES
    from bench_model import build_model, build_setup

    from phivision.answer.prompt import PromptFormat

    setup = build_setup(size, num_crops)
    model = build_model(setup, TORCH_DTYPES[dtype], device, "sdpa")
    model.save_pretrained(run / "model")
    setup.processor.save_pretrained(run / "processor")
    config = {"model": str(run / "model"), "method": "full", "prompt": PromptFormat().to_dict()}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def export_and_copy(run: Path, export: Path, clean: Path) -> None:
    from phivision.serve.export import export_run

    export_run(run, export)
    shutil.copytree(export, clean)  # "a clean directory": nothing but the exported files


# -------------------------------------------------------------------------------- child: no phivision here


class BlockPhivision(importlib.abc.MetaPathFinder):
    """Make ``import phivision`` fail in this process, as on a machine where it is not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "phivision" or name.startswith("phivision."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the export must load without it)")


def synthetic_photos(count: int, seed: int) -> list[Any]:
    """Noise photos of varied sizes and aspect ratios (different crop grids), as bench_model's generation rows."""
    import numpy as np
    from PIL import Image

    sizes = [
        (800, 600),
        (600, 800),
        (1200, 900),
        (500, 1000),
        (1500, 500),
        (336, 336),
        (1024, 683),
        (480, 640),
    ]
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]
    return [photos[i % len(photos)] for i in range(count)]


def time_generation(args: argparse.Namespace) -> None:
    sys.meta_path.insert(0, BlockPhivision())
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoProcessor

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.child, trust_remote_code=True, dtype=dtype, attn_implementation="sdpa"
    )
    model = model.to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.child, trust_remote_code=True, num_crops=args.num_crops)
    print(f"loaded {type(model).__module__}.{type(model).__name__} in {time.perf_counter() - start:.1f} s")
    prompt = "<|user|>\n<|image_1|>What is shown in this image?<|end|>\n<|assistant|>\n"
    photos = synthetic_photos(args.images, args.seed)
    stops = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]

    def answer(batch_photos: list[Any]) -> int:
        batch = processor(text=[prompt] * len(batch_photos), images=batch_photos, padding_side="left")
        batch = {k: v.to(args.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        return out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])

    rows = []
    for size in [int(b) for b in args.batch_sizes.split(",")]:
        answer(photos[:size])  # warm-up, untimed
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, tokens = time.perf_counter(), 0
        for first in range(0, len(photos), size):
            tokens += answer(photos[first : first + size])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if args.device.startswith("cuda") else "-"
        )
        rows.append(
            [
                size,
                len(photos),
                f"{seconds:.2f}",
                f"{len(photos) / seconds:.2f}",
                f"{tokens / seconds:.1f}",
                peak,
            ]
        )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"\ntransformers {transformers.__version__}, torch {torch.__version__}, {device}, {args.dtype}, sdpa, "
        f"num_crops {args.num_crops}, {args.max_new_tokens} new tokens per image, greedy, KV cache\n"
    )
    headers = ["batch", "images", "seconds", "images/s", "new tokens/s", "peak memory"]
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--num-crops", type=int, default=16)
    parser.add_argument("--images", type=int, default=32, help="photos per timed row")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: a temporary directory, removed after"
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child is not None:
        time_generation(args)
        return

    sys.path.insert(0, str(Path(__file__).parent))  # bench_model
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="phivision-gpu-export-"))
    try:
        start = time.perf_counter()
        write_full_run(workdir / "run", args.size, args.dtype, args.device, args.num_crops)
        print(f"1. random-init {args.size} model saved as a full RUN: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        export_and_copy(workdir / "run", workdir / "export", workdir / "clean")
        size = sum(p.stat().st_size for p in (workdir / "clean").iterdir()) / 2**30
        print(
            f"2. exported ({size:.2f} GiB) and copied to a clean directory: {time.perf_counter() - start:.1f} s"
        )
        env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "modules"), "HF_HUB_OFFLINE": "1"}
        child = [sys.executable, __file__, "--child", str(workdir / "clean")]
        for name in (
            "size",
            "device",
            "dtype",
            "num_crops",
            "images",
            "batch_sizes",
            "max_new_tokens",
            "seed",
        ):
            child += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        print("3. loaded with trust_remote_code=True in a process without phivision:", flush=True)
        subprocess.run(child, env=env, check=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
