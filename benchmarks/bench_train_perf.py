"""CPU benchmarks of issue 9's training changes, each measured side by side in one run (ratios, not absolutes).

    memory   peak training memory with answer-only logits vs every position's logits: mid-size model (hidden
             1024, 8 layers, official 32,064-token vocabulary, CLIP at the real 336 px geometry with 2 layers),
             16 crops, batch 4, LoRA r 64, gradient checkpointing, one training step per fresh process; against
             the code paths of the issue's main (all logits, CLIP on every tile slot with autograd, untiled MLP)
    packing  tokens/s of padded batches (fixed 4 rows, shuffled or length-grouped; or a token budget) vs packed
             rows, one epoch over the same rows of a sample catalog (mixed aspect ratios), small model, 16 crops
    clip     image-embedding time when every tile slot goes through CLIP (before) vs only the tiles each image
             uses (now), real 336 px CLIP tile geometry (width 256, 2 layers by default), sample-catalog photos

    python benchmarks/bench_train_perf.py memory
    python benchmarks/bench_train_perf.py packing
    python benchmarks/bench_train_perf.py clip

Memory is measured as the peak resident set size (``ru_maxrss``) of a fresh Python process per variant, started
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every allocation above 64 KiB with its own mapping and
returns it to the system when freed: the process's RSS then follows the live tensors, and its peak is the most
memory the variant ever held (weights, adapters, optimizer state, activations, logits and their gradients, plus
the Python/torch baseline, which is the same for every variant). The variants differ only in ``answer_only``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402  (the benchmarks' shared model/processor builders)

from phivision.answer.prompt import PromptFormat  # noqa: E402
from phivision.data import load_catalog  # noqa: E402
from phivision.data.sample import write_sample_catalog  # noqa: E402
from phivision.model import modeling_phi3_v  # noqa: E402
from phivision.model.modeling_phi3_v import Phi3ImageEmbedding  # noqa: E402
from phivision.train.data import BatchPlan, ProductDataset, pack_examples, split_rows  # noqa: E402
from phivision.train.loop import answer_loss  # noqa: E402
from phivision.train.methods import apply_method  # noqa: E402

# ``packing``: a small decoder, CLIP at the real tile geometry (so token counts are the real ones) but narrow.
SMALL_TEXT = {**bm.MID_TEXT, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2}
SMALL_TEXT.update(num_attention_heads=4, num_key_value_heads=4)
SMALL_VISION = {**bm.MID_VISION, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2}


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def setup_with(text: dict[str, Any], vision: dict[str, Any], num_crops: int) -> bm.Setup:
    """bench_model's builder with other sizes (the tiny tokenizer, the official vocabulary)."""
    saved = bm.MID_TEXT, bm.MID_VISION
    bm.MID_TEXT, bm.MID_VISION = text, vision
    try:
        return bm.build_setup("mid", num_crops)
    finally:
        bm.MID_TEXT, bm.MID_VISION = saved


# ----------------------------------------------------------------------------------------------- memory


VARIANTS = {
    "issue": "issue's main: all logits, every tile slot through all of CLIP with autograd, untiled MLP",
    "all": "now, every position's logits",
    "answer": "now (answer-only logits)",
}


def whole_tower_hidden(embedding: Phi3ImageEmbedding, tiles: torch.Tensor) -> torch.Tensor:
    """CLIP as main ran it when issue 9 was filed: the whole tower, every hidden state kept."""
    clip = embedding.img_processor.vision_model
    return clip(tiles, output_hidden_states=True).hidden_states[embedding.layer_idx]


def memory_child(args: argparse.Namespace) -> None:
    """One variant in this (fresh) process: build, one training step, print the RSS figures as JSON.

    ``bf16`` is how the training recipe runs LoRA (``precision: bf16`` in configs/lora.yaml): frozen base weights
    in bf16, the adapters in fp32, bf16 autocast (needs a CPU with native bf16 to finish in reasonable time).
    """
    torch.set_num_threads(args.threads)
    # The code paths this issue replaced, restored in this process only: every tile slot through the whole tower
    # in one call, under autograd (every_tile_features bypasses the frozen-tower check of the model's forward),
    # and an untiled MLP.
    if args.variant == "issue":
        modeling_phi3_v.MLP_TILE_POSITIONS = modeling_phi3_v.CLIP_CHUNK_POSITIONS = 2**62
        Phi3ImageEmbedding.clip_hidden = whole_tower_hidden
        Phi3ImageEmbedding.forward = every_tile_features
    bf16 = args.precision == "bf16"
    setup = bm.build_setup("mid", 16)
    model = bm.build_model(setup, torch.bfloat16 if bf16 else torch.float32, "cpu", "sdpa", seed=0)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model = apply_method(model, bm.lora_config(args)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:  # as the training loop does: trained weights stay fp32
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    batch = bm.Batches(setup, bm.synthetic_images(0), 4, 16, "cpu")[0]
    before = max_rss_gib()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, count = answer_loss(model, batch, answer_only=args.variant == "answer")
    (loss / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    result = {
        "precision": args.precision,
        "variant": args.variant,
        "positions": batch["input_ids"].numel(),
        "tokens": int(batch["attention_mask"].sum()),
        "answer_tokens": count,
        "loss": loss.item() / count,
        "rss_before_step_gib": before,
        "peak_rss_gib": max_rss_gib(),
        "step_s": seconds,
    }
    print(json.dumps(result))


def run_memory(args: argparse.Namespace) -> None:
    print(
        f"## Peak training memory: answer-only logits vs all logits (`--size mid`, CPU)\n\n{bm.environment('cpu')}\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    results = []
    for precision in args.precisions.split(","):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "memory-child", "--threads", str(args.threads)]
            command += ["--precision", precision, "--variant", variant]
            command += ["--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  done {results[-1]}", file=sys.stderr, flush=True)
    table = []
    for r in results:
        same = {o["variant"]: o for o in results if o["precision"] == r["precision"]}
        table.append(
            [
                r["precision"],
                VARIANTS[r["variant"]],
                f"{r['positions']:,} / {r['tokens']:,} / {r['answer_tokens']}",
                f"{r['loss']:.6f}",
                f"{r['rss_before_step_gib']:.2f}",
                f"{r['peak_rss_gib']:.2f}",
                f"{r['peak_rss_gib'] - r['rss_before_step_gib']:.2f}",
                f"{r['peak_rss_gib'] / same['issue']['peak_rss_gib']:.2f}",
                f"{r['peak_rss_gib'] / same['all']['peak_rss_gib']:.2f}",
                f"{r['step_s']:.1f}",
            ]
        )
    headers = ["precision", "variant", "positions / tokens / answer tokens", "loss", "RSS before step GiB"]
    headers += ["peak RSS GiB", "step's rise GiB", "peak vs issue's main", "peak vs all logits now", "step s"]
    print(bm.markdown_table(headers, table))
    print(
        f"\nLoRA r {args.lora_r} alpha {args.lora_alpha} (qkv/o/gate_up/down, dropout 0.05), gradient checkpointing, "
        f"AdamW, batch 4 (photos {', '.join(f'{w}x{h}' for w, h in bm.IMAGE_SIZES[:4])}) at 16 crops, SDPA, "
        f"{args.threads} torch threads; fp32: every weight fp32; bf16: the recipe's LoRA precision (frozen weights "
        "bf16, adapters fp32, bf16 autocast); one training step per fresh process with "
        "MALLOC_MMAP_THRESHOLD_=65536; RSS before step = peak RSS after building the model and the batch; the same "
        "loss in every variant of a precision shows they compute the same thing"
    )


# ----------------------------------------------------------------------------------------------- packing


def run_packing(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    setup = setup_with(SMALL_TEXT, SMALL_VISION, args.num_crops)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_sample_catalog(Path(tmp) / "data", n=args.catalog_rows, seed=0)
        rows = split_rows(load_catalog(data), "train").head(args.rows)
        dataset = ProductDataset(data, rows, setup.processor, PromptFormat())
        examples = [dataset[i] for i in range(len(dataset))]
    lengths = [len(e["input_ids"]) for e in examples]
    budget = args.batch * max(lengths)
    plans = {
        "padded, 4 rows, shuffled": (BatchPlan(lengths, args.batch, 0, group_by_length=False), False),
        "padded, 4 rows, length-grouped (default)": (BatchPlan(lengths, args.batch, 0), False),
        f"padded, token budget {budget:,}, length-grouped": (
            BatchPlan(lengths, 0, 0, max_tokens=budget),
            False,
        ),
        f"packed, token budget {budget:,}": (BatchPlan(lengths, 0, 0, max_tokens=budget, packing=True), True),
    }
    model = bm.build_model(setup, torch.float32, "cpu", "sdpa", seed=0)
    model.config.use_cache = False
    model = apply_method(model, bm.lora_config(args)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    print(f"## Packed vs padded training steps (CPU)\n\n{bm.environment('cpu')}\n")
    timings: dict[str, list[float]] = {name: [] for name in plans}
    cpu: dict[str, list[float]] = {name: [] for name in plans}
    counts: dict[str, tuple[int, int, int, int]] = {}
    for repeat in range(args.repeats):  # modes interleaved, so a load change on the machine hits all of them
        for name, (plan, packed) in plans.items():
            batches = [[examples[i] for i in batch] for batch in plan.epoch(0)]
            collated = [pack_examples(b) if packed else setup.processor.collate(b) for b in batches]
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in collated:
                loss, count = answer_loss(model, batch)
                (loss / max(count, 1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            timings[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            tokens = sum(sum(lengths[i] for i in b) for b in plan.epoch(0))
            positions = sum(b["input_ids"].numel() for b in collated)
            counts[name] = (len(collated), sum(len(b) for b in batches), tokens, positions)
            print(
                f"  repeat {repeat}: {name} {timings[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU",
                file=sys.stderr,
                flush=True,
            )
    table = []
    base = None
    for name in plans:
        steps, used, tokens, positions = counts[name]
        seconds, cpu_seconds = statistics.median(timings[name]), statistics.median(cpu[name])
        rate = tokens / cpu_seconds
        base = base or rate
        table.append(
            [
                name,
                steps,
                used,
                f"{tokens:,}",
                f"{100 * (positions - tokens) / positions:.1f}%",
                f"{seconds:.1f}",
                f"{cpu_seconds:.1f}",
                f"{rate:,.0f}",
                f"{rate / base:.2f}x",
            ]
        )
    headers = ["batches", "steps", "rows", "tokens", "padding", "wall s / epoch", "CPU s / epoch"]
    headers += ["tokens per CPU s", "vs first"]
    print(bm.markdown_table(headers, table))
    print(
        f"\n{len(lengths)} train rows of a {args.catalog_rows}-product sample catalog (`phivision sample`, canvases "
        f"256-672 px, aspect ratios 1:1.8 to 1.8:1), {args.num_crops} crops: {min(lengths):,} to "
        f"{max(lengths):,} tokens per example; decoder hidden {SMALL_TEXT['hidden_size']}, "
        f"{SMALL_TEXT['num_hidden_layers']} layers, vocabulary {bm.OFFICIAL_VOCAB:,}; CLIP 336 px, width "
        f"{SMALL_VISION['hidden_size']}, {SMALL_VISION['num_hidden_layers']} layers; fp32, SDPA, LoRA r "
        f"{args.lora_r}, answer-only logits in every mode; one epoch per mode, modes interleaved, "
        f"{args.repeats} repeat(s), median; {args.threads} torch threads; token budget = {args.batch} x the "
        "longest example (the padded batch's worst case). Throughput is per CPU second of the process "
        "(time.process_time): the shared machine's load changed the wall time by 2x between runs"
    )


# ----------------------------------------------------------------------------------------------- clip


def every_tile_features(embedding: Phi3ImageEmbedding, pixel_values: torch.Tensor, image_sizes: torch.Tensor):
    """The image features as computed before issue 9: every tile slot goes through CLIP, under autograd."""
    num_images, slots = pixel_values.shape[:2]
    merged = embedding.tile_features(pixel_values.flatten(0, 1)).unflatten(0, (num_images, slots))
    grids = embedding.crop_grid(image_sizes, slots - 1)
    sequences = [embedding.hd_sequence(m, r, c) for m, (r, c) in zip(merged, grids, strict=True)]
    return embedding.drop(embedding.img_projection(torch.cat(sequences)))


@torch.no_grad()
def run_clip(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"## CLIP work on padding tiles (CPU)\n\n{bm.environment('cpu')}\n")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_sample_catalog(Path(tmp) / "data", n=args.images, seed=1)
        catalog = load_catalog(data)
        from phivision.data.images import load_image

        images = [load_image(data / p) for p in catalog["image_path"].head(args.images)]
    table = []
    vision = {**bm.MID_VISION, "hidden_size": args.clip_width, "intermediate_size": 4 * args.clip_width}
    vision["num_attention_heads"] = args.clip_width // 64
    for crops in (16, 4):
        setup = setup_with(bm.MID_TEXT, vision, crops)
        embedding = Phi3ImageEmbedding(setup.config).eval()
        inputs = setup.processor.image_processor(images, num_crops=crops)
        pixel_values, image_sizes = inputs["pixel_values"], inputs["image_sizes"]
        grids = embedding.crop_grid(image_sizes, crops)
        used = sum(1 + r * c for r, c in grids)
        slots = pixel_values.shape[0] * pixel_values.shape[1]
        times: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(args.repeats):  # interleaved, so a load change on the machine hits both
            start = time.perf_counter()
            reference = every_tile_features(embedding, pixel_values, image_sizes)
            times["before"].append(time.perf_counter() - start)
            start = time.perf_counter()
            features = embedding(pixel_values, image_sizes)
            times["now"].append(time.perf_counter() - start)
        diff = (features - reference).abs().max().item()
        before, now = statistics.median(times["before"]), statistics.median(times["now"])
        table.append(
            [
                crops,
                len(images),
                slots,
                used,
                f"{before:.2f}",
                f"{now:.2f}",
                f"{now / before:.2f}",
                f"{diff:.1e}",
            ]
        )
    headers = ["crops", "images", "tiles before", "tiles now", "before s", "now s", "time now / before"]
    print(bm.markdown_table([*headers, "max abs feature diff"], table))
    sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
    print(
        f"\nphotos ({sizes}) from a `phivision sample` catalog; CLIP 336 px / patch 14 (577 tokens per tile), "
        f"width {args.clip_width}, {vision['num_hidden_layers']} layers (the real tower: width 1024, 24 layers; "
        "time scales with tiles x depth, the ratio follows the tiles); image embedding forward (CLIP, 2x2 merge, "
        "HD layout, projector) under no_grad, fp32; "
        f"{args.repeats} repeats, median; {args.threads} torch threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    memory = sub.add_parser("memory", help="peak memory, answer-only vs all logits")
    child = sub.add_parser("memory-child", help=argparse.SUPPRESS)
    memory.add_argument(
        "--precisions",
        default="fp32",
        help="comma-separated: fp32, bf16 (the recipe's; needs native CPU bf16)",
    )
    child.add_argument("--precision", choices=["fp32", "bf16"], required=True)
    child.add_argument("--variant", choices=list(VARIANTS), required=True)
    packing = sub.add_parser("packing", help="tokens/s, packed vs padded")
    packing.add_argument("--catalog-rows", type=int, default=60)
    packing.add_argument("--rows", type=int, default=16)
    packing.add_argument("--batch", type=int, default=4)
    packing.add_argument("--num-crops", type=int, default=16)
    packing.add_argument("--repeats", type=int, default=2)
    clip = sub.add_parser("clip", help="CLIP time, every tile vs used tiles")
    clip.add_argument("--images", type=int, default=6)
    clip.add_argument("--clip-width", type=int, default=256, help="CLIP width (real: 1024)")
    clip.add_argument("--repeats", type=int, default=2)
    for p in (memory, child, packing, clip):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--lora-r", type=int, default=64)
        p.add_argument("--lora-alpha", type=int, default=128)
    args = parser.parse_args()
    {"memory": run_memory, "memory-child": memory_child, "packing": run_packing, "clip": run_clip}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
