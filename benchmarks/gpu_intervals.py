"""The cost of a price range on a GPU: constrained answers with the price's digit distribution recorded, against
plain constrained greedy answers and against K sampled answers, on the full-size stand-in checkpoint in bf16.

    python benchmarks/gpu_intervals.py --work /tmp/gi                        # GPU: full size, bf16, batch 1 and 16
    python benchmarks/gpu_intervals.py --work /tmp/gi --size small --device cpu --dtype fp32 --images 4 \
        --batch-sizes 1,2 --samples 2 --rounds 1                             # a CPU smoke run of the same steps

Steps, each printed with its time:

1. A stand-in of Phi-3-Vision-128K-Instruct (``phivision.model.standin``: the real config, tokenizer and shard
   layout from ``tests/reference``, random weights; 4.15 B parameters) in ``WORK/standin`` (kept for a rerun).
   ``--size small`` shrinks it to 2 decoder and 2 CLIP layers and 4 crops (the real vocabulary and CLIP
   geometry).
2. ``--images`` photos of a synthetic catalog (``phivision sample``), answered under the constraint with the
   catalog's categories (the taxonomy of a real evaluation).
3. For each batch size, one untimed warm-up of each way of answering, then ``--rounds`` rounds, each answering
   every photo: greedy; greedy with the digit distribution (``price_spread=True``: what a price range costs);
   ``--samples`` answers per photo at temperature 1 (the alternative measured in bench_intervals.py). The three
   are interleaved within a round and timed with the device synchronised, so they see the same clocks.
   Prints seconds per photo and the ratio to greedy; checks that recording the distribution changed no answer.

Random weights write random titles, so answers run to the budget (``--max-new-tokens``) much as a real model's
long answers would; the three ways of answering generate the same tokens (greedy) or as many (samples).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "phi-3-vision-128k-instruct"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)


def standin(work: Path, size: str, dtype: torch.dtype, started: float) -> Path:
    from phivision.model.standin import write_standin_checkpoint

    out = work / f"standin-{size}-{str(dtype).removeprefix('torch.')}"
    if (out / "config.json").is_file():
        log(started, f"reusing {out}")
        return out
    small = {"num_hidden_layers": 2, "vision": {"num_hidden_layers": 2}, "num_crops": 4}
    write_standin_checkpoint(out, REFERENCE, dtype=dtype, **({} if size == "full" else small))
    log(started, f"wrote the {size} stand-in to {out}")
    return out


def photos(work: Path, n: int) -> tuple[list, tuple[str, ...]]:
    from phivision.data.images import load_image
    from phivision.data.layout import load_catalog
    from phivision.data.sample import write_sample_catalog

    data = work / f"sample-{n}"
    if not (data / "catalog.parquet").is_file():
        write_sample_catalog(data, n=max(n, 12), seed=0)
    catalog = load_catalog(data).head(n)
    categories = tuple(sorted(set(load_catalog(data)["category"])))
    return [load_image(data / p) for p in catalog["image_path"]], categories


def timed(device: torch.device, answer) -> tuple[float, list]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = answer()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-intervals"))
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    started = time.perf_counter()
    import warnings

    warnings.filterwarnings("ignore", message=".*max_new_tokens.*")

    from phivision.answer.constrain import AnswerConstraint
    from phivision.answer.generate import generate_completions
    from phivision.runs import load_model

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(started, f"{name}; torch {torch.__version__}; {os.cpu_count()} CPUs")
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = standin(args.work, args.size, DTYPES[args.dtype], started)
    images, categories = photos(args.work, args.images)
    loaded = load_model(checkpoint, device=device, dtype=DTYPES[args.dtype])
    parameters = sum(p.numel() for p in loaded.model.parameters())
    log(started, f"loaded {parameters:,} parameters ({args.dtype}) on {device}; {len(images)} photos")
    constraint = AnswerConstraint(loaded.prompt, categories)

    def answer(batch_size: int, **kwargs) -> list:
        many = images * kwargs.pop("copies", 1)
        return generate_completions(
            loaded.model,
            loaded.processor,
            many,
            loaded.prompt,
            batch_size=batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=False,
            constraint=constraint,
            **kwargs,
        )

    ways = {
        "greedy": {},
        "greedy + digit distribution": {"price_spread": True},
        f"{args.samples} samples": {"temperature": 1.0, "copies": args.samples},
    }
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for kwargs in ways.values():
            answer(batch_size, **dict(kwargs))  # warm-up (kernels, the grammar, allocator)
        totals = dict.fromkeys(ways, 0.0)
        for _ in range(args.rounds):
            results = {}
            for way, kwargs in ways.items():
                seconds, results[way] = timed(device, lambda k=kwargs, b=batch_size: answer(b, **dict(k)))
                totals[way] += seconds
            plain, spread = results["greedy"], results["greedy + digit distribution"]
            if [c.text for c in plain] != [c.text for c in spread]:
                sys.exit("recording the price distribution changed a greedy answer")
            if any(c.price_distribution is None for c in spread):
                sys.exit("an answer came back without its price distribution")
        per_photo = {way: seconds / (args.rounds * len(images)) for way, seconds in totals.items()}
        for way, seconds in per_photo.items():
            rows.append((batch_size, way, seconds, seconds / per_photo["greedy"]))
        log(started, f"batch {batch_size} done")

    print("\n| batch | answering | s per photo | x greedy |\n|---:|---|---:|---:|")
    for batch_size, way, seconds, ratio in rows:
        print(f"| {batch_size} | {way} | {seconds:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
