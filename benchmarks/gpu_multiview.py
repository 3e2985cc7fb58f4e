"""Issue 19's GPU part: the multi-view demo catalog trained at full size with 1 and with 4 photos per prompt.

A stand-in of Phi-3-Vision-128K-Instruct (the real config, tokenizer and two-shard layout with random bf16
weights, ``phivision.model.standin``) is fine-tuned with the recipe of ``configs/lora.yaml`` (LoRA r 64, bf16,
SDPA, gradient checkpointing) at ``num_crops`` 4 on ``phivision sample --views 4``, once with ``data.max_images=1``
(the first photo) and once with ``data.max_images=4`` (every photo), the same seed, batches and steps. For each:
tokens per sample (the exact lengths the batch planner uses), training samples/s and tokens/s over the steps after
``--warmup`` (timed by the training loop itself: ``elapsed_s`` in metrics.jsonl; model loading excluded), and the
peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each run).

    python benchmarks/gpu_multiview.py                                   # one H100/H200, about 6 minutes
    python benchmarks/gpu_multiview.py --size small --device cpu --steps 3 --warmup 1   # a check on a CPU

Runs from a checkout without installing it (PYTHONPATH=src is set here) where torch, transformers, peft,
accelerate, pillow, pandas, pyarrow and pyyaml are installed. ``--size small`` shrinks the stand-in to 2 decoder
and 4 CLIP layers (real widths, tokenizer and 336 px crops).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REFERENCES = (
    ROOT / "tests" / "reference" / "phi-3-vision-128k-instruct",
    ROOT.parent / "shared" / "reference" / "phi-3-vision-128k-instruct",
)
SMALL = {"num_hidden_layers": 2, "vision": {"num_hidden_layers": 4}, "layer_idx": -2}


def standin(out: Path, size: str, num_crops: int) -> Path:
    from phivision.model.standin import write_standin_checkpoint

    reference = next((r for r in REFERENCES if (r / "config.json").is_file()), None)
    if reference is None:
        raise SystemExit(f"no reference checkpoint files in {' or '.join(map(str, REFERENCES))}")
    started = time.perf_counter()
    overrides = SMALL if size == "small" else {}
    write_standin_checkpoint(out, reference, num_crops=num_crops, **overrides)
    print(f"stand-in ({size}) from {reference}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def run_arm(base: Path, data: Path, out: Path, max_images: int, args) -> dict:
    """Train ``--steps`` steps with ``data.max_images=max_images``; the throughput and peak memory of the run."""
    import torch

    from phivision.train.config import load_config
    from phivision.train.loop import train
    from phivision.train.tracking import read_metrics

    overrides = [
        f"num_crops={args.num_crops}",
        f"data.max_images={max_images}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=2",
        "optim.grad_accum=1",
        f"schedule.max_steps={args.steps}",
        "schedule.warmup_steps=0",
        "eval.every_steps=0",
        "eval.patience=0",
        "eval.gen_samples=0",
        "eval.max_samples=1",
        "checkpoint.every_steps=0",
        "tracking.log_every=1",
    ]
    if args.device == "cpu":
        overrides += ["precision=fp32", "gradient_checkpointing=false"]
    config = load_config(
        ROOT / "configs" / "lora.yaml", overrides, model=str(base), out=str(out), data={"path": str(data)}
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(config, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    logs = read_metrics(out, "train")
    timed = [r for r in logs if r["step"] > args.warmup]
    start = next(r["elapsed_s"] for r in logs if r["step"] == args.warmup) if args.warmup else 0.0
    seconds = timed[-1]["elapsed_s"] - start
    return {"samples_s": len(timed) * args.batch_size / seconds, "peak_gib": peak, "seconds": seconds}


def tokens_per_sample(base: Path, data: Path, max_images: int, num_crops: int) -> float:
    from phivision.answer.prompt import PromptFormat
    from phivision.data.layout import load_catalog
    from phivision.model.processing_phi3_v import Phi3VProcessor
    from phivision.train.data import ProductDataset, split_rows

    processor = Phi3VProcessor.from_pretrained(base, num_crops=num_crops)
    rows = split_rows(load_catalog(data), "train")
    return statistics.fmean(
        ProductDataset(data, rows, processor, PromptFormat(), max_images=max_images).lengths()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step (configs/lora.yaml's 4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--n", type=int, default=160, help="products in the multi-view catalog")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()

    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --size small to check the script)")
    if args.device == "cuda":
        print(
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {transformers.__version__}",
        flush=True,
    )

    from phivision.data.sample import write_sample_catalog

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-multiview-"))
    base = standin(work / "base", args.size, args.num_crops)
    data = write_sample_catalog(work / "data", n=args.n, seed=0, views=4)
    rows = []
    for max_images in (1, 4):
        result = run_arm(base, data, work / f"run-{max_images}", max_images, args)
        tokens = tokens_per_sample(base, data, max_images, args.num_crops)
        rows.append((max_images, tokens, result))
        print(f"  max_images={max_images}: {result}", flush=True)

    print(
        f"\nstand-in {args.size}, LoRA r 64 (configs/lora.yaml), num_crops {args.num_crops}, batch {args.batch_size}, "
        f"{args.steps} steps ({args.warmup} untimed), {args.n}-product catalog with 1 to 4 photos per product\n"
    )
    print("| photos per prompt | tokens per sample | samples/s | tokens/s | peak GPU memory |")
    print("|---|---:|---:|---:|---:|")
    for max_images, tokens, result in rows:
        peak = "n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.1f} GiB"
        print(
            f"| max_images={max_images} | {tokens:.0f} | {result['samples_s']:.2f} | "
            f"{result['samples_s'] * tokens:,.0f} | {peak} |"
        )


if __name__ == "__main__":
    main()
