"""Every photo of a product vs the first photo only (issue 19), on a multi-view synthetic catalog, tiny model.

The catalog is ``phivision sample --views 4``: each product has 1 to 4 photos; beyond one, the front view hides the
material and shares its silhouette with another department, while the detail, back and packshot views show what
the front leaves out (``phivision.data.sample``). Two runs of the demo recipe (full fine-tuning of the tiny random
model, the same seed, steps and data order) differ only in ``data.max_images``: 1 (the first photo) and
``--max-images`` (every photo, up to that many). Each run is evaluated on the test split with as many photos as
it was trained with (constrained answers, the default), and the per-item scores give paired bootstrap intervals
of the difference (``phivision.evaluate.bootstrap.paired_difference_intervals``: both runs scored on the same
items, the same resamples).

Cost: tokens per training sample (the exact lengths the batch planner uses: prompt text, every photo's image
tokens, answer) and training samples/s, measured in ``--rounds`` interleaved rounds of ``--steps`` steps per
setting (a short run each, timed by the training loop itself: ``elapsed_s`` in metrics.jsonl, the first
``--warmup`` steps left out because the first epoch fills the example cache), so a machine whose load drifts
slows both alike; tokens/s = samples/s x tokens per sample.

    python benchmarks/bench_multiview.py                       # 600 products, 30 epochs, 1 thread
    python benchmarks/bench_multiview.py --n 300 --epochs 10   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch loads: see phivision.demo.quiet_openmp_waits
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METRICS = (("category_accuracy", "category accuracy", 100, "pp"), ("price_mape", "price MAPE", 100, "pp"))


def build(out: Path, n: int, seed: int, views: int) -> tuple[Path, Path]:
    """The multi-view catalog and the tiny checkpoint (its tokenizer knows the catalog's words, as the demo's)."""
    from phivision.data.layout import load_catalog
    from phivision.data.sample import write_sample_catalog
    from phivision.tiny import write_tiny_checkpoint

    data, base = out / "data", out / "base"
    if not (data / "catalog.parquet").is_file():
        write_sample_catalog(data, n=n, seed=seed, views=views)
    if not (base / "config.json").is_file():
        catalog = load_catalog(data)
        write_tiny_checkpoint(base, seed=seed, corpus=[*catalog["title"], *catalog["category"]])
    return data, base


def config(data: Path, base: Path, run: Path, max_images: int, seed: int, threads: int, extra: list[str]):
    from phivision.demo import demo_config_path
    from phivision.train.config import load_config

    overrides = [f"data.max_images={max_images}", f"num_threads={threads}", *extra]
    return load_config(
        demo_config_path(), overrides, model=str(base), out=str(run), seed=seed, data={"path": str(data)}
    )


def train_and_evaluate(data: Path, base: Path, run: Path, max_images: int, args) -> list[dict]:
    """Train one arm (reused when finished) and score its test split; returns predictions.jsonl's records."""
    from phivision.api import evaluate
    from phivision.train.loop import train

    extra = [f"schedule.epochs={args.epochs}"]
    if (
        not (run / "trainer_state.json").is_file()
        or not json.loads((run / "trainer_state.json").read_text())["done"]
    ):
        started = time.perf_counter()
        train(
            config(data, base, run, max_images, args.seed, args.threads, extra), resume=True, progress=False
        )
        print(f"  trained max_images={max_images} in {time.perf_counter() - started:.0f} s", flush=True)
    stage = run / "eval" / "test"
    if not (stage / "metrics.json").is_file():
        evaluate(run, data, stage, split="test", progress=False)
    return [json.loads(line) for line in (stage / "predictions.jsonl").read_text().splitlines()]


def tokens_per_sample(data: Path, base: Path, max_images: int) -> float:
    from phivision.answer.prompt import PromptFormat
    from phivision.data.layout import load_catalog
    from phivision.model.processing_phi3_v import Phi3VProcessor
    from phivision.train.data import ProductDataset, split_rows

    rows = split_rows(load_catalog(data), "train")
    lengths = ProductDataset(
        data, rows, Phi3VProcessor.from_pretrained(base), PromptFormat(), max_images=max_images
    )
    return statistics.fmean(lengths.lengths())


def samples_per_second(data: Path, base: Path, out: Path, max_images: int, args) -> float:
    """Training samples/s of the recipe after its first ``--warmup`` steps (the first epoch fills the example
    cache), timed by the loop itself (model loading and imports excluded)."""
    from phivision.train.loop import train
    from phivision.train.tracking import read_metrics

    run = Path(tempfile.mkdtemp(dir=out, prefix=f"timing-{max_images}-"))
    extra = [f"schedule.max_steps={args.steps}", "tracking.log_every=1"]
    cfg = config(data, base, run, max_images, args.seed, args.threads, extra)
    cfg.eval.gen_samples = 0
    cfg.eval.max_samples = 1
    train(cfg, progress=False)
    logs = read_metrics(run, "train")
    start = next(r for r in logs if r["step"] >= args.warmup)
    return (
        (logs[-1]["step"] - start["step"])
        * cfg.data.batch_size
        / (logs[-1]["elapsed_s"] - start["elapsed_s"])
    )


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--n", type=int, default=600, help="products in the catalog")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=4, help="photos per prompt of the every-photo run")
    parser.add_argument(
        "--epochs", type=float, default=30, help="training epochs of both runs (the demo's 30)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the demo's 1 on a shared box)"
    )
    parser.add_argument("--steps", type=int, default=90, help="steps per timing run")
    parser.add_argument(
        "--warmup",
        type=int,
        default=30,
        help="steps of a timing run left untimed (the first epoch: 480 rows / 16)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args()

    import torch
    import transformers

    from phivision.evaluate.bootstrap import bootstrap_intervals, paired_difference_intervals
    from phivision.evaluate.metrics import ItemScores, aggregate

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-multiview-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; work dir {out}")
    print(f"load before: {load()}", flush=True)
    data, base = build(out, args.n, args.seed, views=args.max_images)
    arms = (1, args.max_images)
    records = {k: train_and_evaluate(data, base, out / f"run-{k}", k, args) for k in arms}
    print(f"load after training: {load()}", flush=True)

    first, every = records[1], records[args.max_images]
    assert [r["id"] for r in first] == [r["id"] for r in every]
    plain = {
        k: {m: float(v[0]) for m, v in aggregate(ItemScores.from_records(r), [[1.0] * len(r)]).items()}
        for k, r in records.items()
    }
    single = {k: bootstrap_intervals(r, args.resamples) for k, r in records.items()}
    difference = paired_difference_intervals(first, every, args.resamples)

    speed: dict[int, list[float]] = {k: [] for k in arms}
    for _ in range(args.rounds):
        for k in arms:
            speed[k].append(samples_per_second(data, base, out, k, args))
    tokens = {k: tokens_per_sample(data, base, k) for k in arms}
    print(f"load after timing: {load()}")

    photos = [len(r["images"]) for r in every]
    print(
        f"\n{args.n} products ({len(first)} test items; photos per test item in the every-photo run: "
        f"{', '.join(f'{c}: {photos.count(c)}' for c in sorted(set(photos)))}), demo recipe, {args.epochs:g} epochs, "
        f"seed {args.seed}, {args.threads} thread(s); 95% paired bootstrap, {args.resamples} resamples\n"
    )
    head = f"| metric | first photo (max_images=1) | every photo (max_images={args.max_images}) | difference (every - first) |"
    print(head)
    print("|---|---:|---:|---:|")
    for key, label, scale, unit in METRICS:
        cells = []
        for k in arms:
            low, high = single[k][key]
            cells.append(f"{plain[k][key] * scale:.1f}% [{low * scale:.1f}, {high * scale:.1f}]")
        low, high = difference[key]
        delta = (plain[args.max_images][key] - plain[1][key]) * scale
        cells.append(f"{delta:+.1f} {unit} [{low * scale:+.1f}, {high * scale:+.1f}]")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        f"| tokens per training sample | {tokens[1]:.1f} | {tokens[args.max_images]:.1f} | x{tokens[args.max_images] / tokens[1]:.2f} |"
    )
    rate = {k: statistics.median(v) for k, v in speed.items()}
    print(
        f"| training samples/s (median of {args.rounds}) | {rate[1]:.1f} | {rate[args.max_images]:.1f} | "
        f"x{rate[args.max_images] / rate[1]:.2f} |"
    )
    print(
        f"| training tokens/s | {rate[1] * tokens[1]:,.0f} | {rate[args.max_images] * tokens[args.max_images]:,.0f} | "
        f"x{rate[args.max_images] * tokens[args.max_images] / (rate[1] * tokens[1]):.2f} |"
    )
    print(
        "\nsamples/s per round: "
        + "; ".join(f"max_images={k}: {', '.join(f'{v:.1f}' for v in speed[k])}" for k in arms)
        + "; ratio per round: "
        + ", ".join(f"x{b / a:.2f}" for a, b in zip(speed[1], speed[args.max_images], strict=True))
    )
    print(
        "\nby the photos a test product has (the every-photo run sees them all, the first-photo run one):\n"
    )
    print("| photos | items | first photo: category accuracy, MAPE | every photo: category accuracy, MAPE |")
    print("|---|---:|---:|---:|")
    for label, members in (("1", [n == 1 for n in photos]), ("2 to 4", [n > 1 for n in photos])):
        cells = []
        for k in arms:
            chosen = [r for r, keep in zip(records[k], members, strict=True) if keep]
            accuracy = statistics.fmean(r["errors"]["category_correct"] for r in chosen)
            mape = statistics.fmean(r["errors"]["price_ape"] for r in chosen)
            cells.append(f"{accuracy * 100:.1f}%, {mape * 100:.1f}%")
        print(f"| {label} | {sum(members)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
