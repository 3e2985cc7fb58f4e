"""Model benchmarks for Phi-3-Vision: step time, LoRA training throughput and MFU, generation speed, bf16 error.

Every subcommand prints markdown tables, ready to paste into ``benchmarks/RESULTS.md``:

    forward    forward + backward over all weights (no optimizer): median step time and peak memory
    train      LoRA steps with AdamW (the project's ``apply_method``): samples/s, tokens/s, MFU, peak memory
    generate   batched greedy answers with ``generate_answers``: images/s at batch 1 and 16
    precision  bf16 vs fp32 logits on a left-padded batch of 2 prompts with images

    python benchmarks/bench_model.py forward --device cuda              # full size, bf16, batch 4, 16 crops, SDPA
    python benchmarks/bench_model.py train --device cuda                # 4 rows: batch 1 eager / 8 SDPA x 16 / 4 crops
    python benchmarks/bench_model.py generate --device cuda             # batch 1 and 16, 32 new tokens per image
    python benchmarks/bench_model.py precision --device cuda            # tiny model
    python benchmarks/bench_model.py train --dry-run                    # full size on the meta device: sizes, FLOPs
    python benchmarks/bench_model.py forward --size tiny --device cpu --iters 3   # CPU smoke run

Model. ``--size full`` (the default) is the official Phi-3-Vision-128K-Instruct architecture, read from the
official ``config.json`` kept in ``tests/model/data/`` (4,146,621,440 parameters, CLIP ViT-L/14-336 tower), built
with random weights by ``AutoModelForCausalLM.from_config`` directly on ``--device`` in ``--dtype``: no weights
are downloaded, so speed and memory are the real model's, the answers are noise. ``--size tiny`` uses
``phivision.tiny``'s config (2 layers, 56 px tiles), for smoke runs on CPU.

Inputs. Synthetic noise photos of 8 sizes and aspect ratios (so the HD crop grids, and the image-token counts,
differ between rows) go through the real processor: ``build_example`` (prompt, image, an answer of the trained
format) and ``collate`` (right padding) for training, the processor's ``__call__`` (left padding) for generation.
Both sizes use the tiny tokenizer of ``phivision.tiny_tokenizer`` (the real one cannot be fetched offline); its
ids are below 1,024, inside the official 32,064-token vocabulary. Text is a small share of a sample (an image at
16 crops is 1,900 to 2,500 image tokens, the text about 30), so token counts are close to the real tokenizer's.
Batch ``i`` takes images ``i*b .. i*b+b-1`` of the 8 (cyclically); inputs are moved to the device before timing.

Timing. ``--warmup`` untimed steps, then ``--iters`` timed ones, each between two ``torch.cuda.synchronize()`` on
CUDA. Step time is the median; samples/s and tokens/s are totals over the timed steps divided by their summed
time. Tokens are the non-padding tokens of the batch (text and image tokens; ``attention_mask.sum()``).

Memory. CUDA: ``torch.cuda.max_memory_allocated()``, reset after each row's model is built, so it includes the
weights, gradients, optimizer state and activations of that row (not the allocator's cache or the CUDA context).
CPU: the peak resident set size of the whole process since it started (``resource.getrusage``, ``ru_maxrss``), so
it never goes down from one row to the next and includes Python, torch and the inputs.

MFU (``train``). The standard estimate of model FLOPs for forward + backward:

    FLOPs per step = 6 * N * T
    MFU            = FLOPs per step / step time / (peak TFLOP/s * 1e12)

with N all parameters of the model, frozen ones included (the backward pass still propagates activation gradients
through the frozen weights), plus the LoRA adapters, and T the non-padding tokens of the step (image tokens
included). ``--peak-tflops`` defaults to 989 (H100 SXM, dense bf16; no MFU is printed on CPU unless it is given).
What the estimate leaves out, so the figures are comparable with other 6NT figures but are not exact FLOP counts:
attention's own FLOPs (quadratic in the sequence); that LoRA computes no weight gradients for frozen weights
(about 4NT of real work in the language model, not 6NT); and that the CLIP tower (0.3 B parameters) runs on
``(used crops + 1) * 577`` patch tokens per image, not on the image's 1,900 to 2,500 language-model tokens, and with
LoRA on the language model only, gets no backward pass at all.

Generation (``generate``). ``phivision.answer.generate.generate_answers`` (processor, left padding, KV cache,
greedy) on ``--images`` photos, after one untimed warm-up batch. With random weights the model would stop at a
random step, so every answer is forced to exactly ``--max-new-tokens`` tokens: ``model.generate`` is wrapped to
pass ``min_new_tokens=max_new_tokens`` (stop tokens are masked until then, and ``max_new_tokens`` stops it there),
and the wrapper counts the tokens really generated. The time includes image preprocessing and decoding, as in a
real evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoModelForCausalLM

import phivision.model  # noqa: F401  (registers phi3_v with the Auto* classes)
from phivision.answer.prompt import PromptFormat, format_answer, prompt_text
from phivision.errors import PhivisionError
from phivision.model import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from phivision.model.image_processing_phi3_v import hd_geometry
from phivision.tiny import tiny_config
from phivision.tiny_tokenizer import build_tiny_tokenizer
from phivision.train.config import LoraConfig, TrainConfig
from phivision.train.data import pack_examples
from phivision.train.kernels import apply_liger, require_liger
from phivision.train.loop import answer_loss
from phivision.train.methods import VISION_PREFIX, apply_method

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_CONFIG = ROOT / "tests" / "model" / "data" / "phi-3-vision-128k-instruct.config.json"
# (width, height) of the synthetic photos: square, portrait, landscape, tall, a wide banner, small.
IMAGE_SIZES = [
    (800, 800),
    (600, 800),
    (1200, 900),
    (500, 1000),
    (1500, 500),
    (336, 336),
    (1024, 683),
    (480, 640),
]
ANSWER = format_answer(PromptFormat(), "Check Cotton Shirt", "Shirts", 1290.0)
OFFICIAL_VOCAB = 32064
# ``--size mid``: the mid-size CPU config. The official vocabulary (so logits are as large per token as
# the real model's), a 1024-wide 8-layer decoder, and CLIP at the real 336 px / patch 14 geometry (577 tokens per
# tile, 144 image tokens per tile) with the real width but 2 layers.
MID_TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "sliding_window": 131072,
}
MID_VISION = {
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "projection_dim": 768,
}
SIZES = ["full", "mid", "tiny"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
H100_BF16_TFLOPS = 989.0
# transformers 5.x warns that names the project still calls (gradient_checkpointing_enable, and the property peft
# reads) will be renamed in v6; the warnings would only split the printed tables.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


# ----------------------------------------------------------------------------------------------- building


@dataclass
class Setup:
    """What every subcommand builds from: a config (sizes only) and the processor that feeds it."""

    config: Phi3VConfig
    processor: Phi3VProcessor
    size: str


def build_setup(size: str, num_crops: int) -> Setup:
    """The official (``full``) or tiny config and a matching processor, with the tiny tokenizer's special ids."""
    tokenizer = build_tiny_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if size == "tiny":
        config = tiny_config(vocab_size=len(tokenizer), **ids)
    elif size == "mid":
        config = tiny_config(vocab_size=OFFICIAL_VOCAB, **ids, **MID_TEXT, vision=MID_VISION)
    else:
        official = json.loads(OFFICIAL_CONFIG.read_text())
        official.pop("_attn_implementation", None)  # flash_attention_2 in the file; each run picks its own
        config = Phi3VConfig(**{**official, **ids})  # the token ids must be the tokenizer's, not 32000
    vision = config.vision_tower_config()
    image_processor = Phi3VImageProcessor(
        num_crops=num_crops,
        crop_size=vision.image_size,
        num_img_tokens=config.img_processor["num_img_tokens"],
    )
    return Setup(config, Phi3VProcessor(image_processor, tokenizer), size)


def build_model(setup: Setup, dtype: torch.dtype, device: str, attn: str, seed: int = 0) -> Phi3VForCausalLM:
    """Random weights, created directly on ``device`` in ``dtype`` (no fp32 copy of the full model first)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(setup.config), dtype=dtype, attn_implementation=attn
        )
    return model


def synthetic_images(seed: int = 0) -> list[Image.Image]:
    """Noise photos of the sizes in IMAGE_SIZES (noise, so no resize or JPEG path is cheaper than a real photo's)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in IMAGE_SIZES]


class Batches:
    """Training batches from the real processor: batch ``i`` holds images ``i*b ..`` (cyclic), cached on device.

    ``packed``: the same examples as one padding-free row (``phivision.train.data.pack_examples``) instead of padded
    rows (``collate``).
    """

    def __init__(
        self,
        setup: Setup,
        images: list[Image.Image],
        batch: int,
        num_crops: int,
        device: str,
        packed: bool = False,
    ):
        self.setup, self.images, self.batch = setup, images, batch
        self.num_crops, self.device, self.packed = num_crops, device, packed
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = (i * self.batch) % len(self.images)
        if start not in self._cache:
            chosen = [self.images[(start + j) % len(self.images)] for j in range(self.batch)]
            processor = self.setup.processor
            examples = [
                processor.build_example(prompt_text(), ANSWER, [image], num_crops=self.num_crops)
                for image in chosen
            ]
            batch = pack_examples(examples) if self.packed else processor.collate(examples)
            self._cache[start] = {k: v.to(self.device) for k, v in batch.items()}
        return self._cache[start]

    def tokens(self, i: int) -> int:
        """Non-padding tokens (text + image) of batch ``i``."""
        batch = self[i]
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def positions(self, i: int) -> int:
        """Positions the decoder computes for batch ``i``, padding included."""
        return self[i]["input_ids"].numel()


# ----------------------------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[int], None], warmup: int, iters: int, device: str) -> list[float]:
    """Seconds of each timed call ``step(i)``, after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + iters):
        sync(device)
        start = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> str:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS since it started."""
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is KiB


def memory_note(device: str) -> str:
    if device.startswith("cuda"):
        return "peak memory: torch.cuda.max_memory_allocated, reset after each row's model was built"
    return "peak memory: CPU run, peak RSS of the whole process since start (resource.getrusage ru_maxrss)"


def free(device: str) -> None:
    """Return a finished row's memory before the next row builds its model."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def out_of_memory_guard(errors: list[str]) -> Iterator[None]:
    """Record a CUDA out-of-memory as a row result instead of ending the whole run."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        errors.append("OOM: " + str(err).splitlines()[0][:80])


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment(device: str) -> str:
    """One line naming the machine and versions, for the record in RESULTS.md."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} torch threads"
    return (
        f"{datetime.date.today()} | {where} | torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by part: all, CLIP tower, projector + separators, language model (the rest), trainable."""
    parts = {"total": 0, "clip": 0, "projector": 0, "trainable": 0}
    for name, param in model.named_parameters():
        parts["total"] += param.numel()
        parts["trainable"] += param.numel() if param.requires_grad else 0
        if VISION_PREFIX in name:
            parts["clip"] += param.numel()
        elif "vision_embed_tokens." in name:
            parts["projector"] += param.numel()
    parts["language"] = parts["total"] - parts["clip"] - parts["projector"]
    return parts


def lora_config(args: argparse.Namespace) -> TrainConfig:
    """The project's LoRA settings (targets qkv_proj, o_proj, gate_up_proj, down_proj of the language model)."""
    return TrainConfig(method="lora", lora=LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=0.05))


# ----------------------------------------------------------------------------------------------- dry run


def dry_run(args: argparse.Namespace) -> None:
    """Build the chosen size on the meta device (no memory, no compute) and print the inputs of the FLOP formula."""
    setup = build_setup(args.size, args.num_crops)
    model = build_model(setup, torch.bfloat16, "meta", "sdpa")
    base = count_parameters(model)
    counts = [
        ["all (N of `forward`)", f"{base['total']:,}"],
        ["language model (embeddings, decoder, lm_head)", f"{base['language']:,}"],
        ["CLIP tower", f"{base['clip']:,}"],
        ["projector + separators", f"{base['projector']:,}"],
    ]
    n = base["total"]
    if args.command == "train":
        lora = count_parameters(apply_method(model, lora_config(args)))
        n = lora["total"]
        counts += [
            [f"LoRA r {args.lora_r} adapters (trainable)", f"{lora['trainable']:,}"],
            ["all with LoRA (N of `train`)", f"{n:,}"],
        ]
    images = synthetic_images(args.seed)
    image_processor = setup.processor.image_processor
    vision = setup.config.vision_tower_config()
    patches = (vision.image_size // vision.patch_size) ** 2 + 1  # CLIP tokens per tile, CLS included
    rows = []
    for (w, h), image in zip(IMAGE_SIZES, images, strict=True):
        example = setup.processor.build_example(prompt_text(), ANSWER, [image], num_crops=args.num_crops)
        image_tokens = image_processor.calc_num_image_tokens(w, h, args.num_crops)
        total = len(example["input_ids"])
        grid_rows, grid_cols = hd_geometry(w, h, args.num_crops, vision.image_size).grid
        clip_tokens = (1 + grid_rows * grid_cols) * patches  # CLIP encodes the used crops + the global view
        rows.append([f"{w}x{h}", image_tokens, total - image_tokens, total, clip_tokens])
    mean_tokens = statistics.mean(r[3] for r in rows)
    peak = args.peak_tflops or H100_BF16_TFLOPS
    flops = 6 * n * mean_tokens
    print(f"## Dry run: `{args.command} --size {args.size}` on the meta device\n")
    print(f"config: {OFFICIAL_CONFIG.relative_to(ROOT) if args.size == 'full' else 'phivision.tiny'}\n")
    print(markdown_table(["parameters", "count"], counts))
    print(f"\n### Tokens per sample at num_crops {args.num_crops} (the synthetic photos)\n")
    headers = ["image (w x h)", "image tokens", "text tokens", "sample tokens", "CLIP tokens"]
    print(markdown_table(headers, rows))
    print(
        f"\nmean sample: {mean_tokens:,.1f} tokens; 6 * N * T = 6 * {n:,} * {mean_tokens:,.1f} = "
        f"{flops / 1e12:.4g} TFLOP per sample (forward + backward); at {peak:g} TFLOP/s peak, 100% MFU would be "
        f"{peak * 1e12 / flops:,.1f} samples/s"
    )


# ----------------------------------------------------------------------------------------------- forward


def run_forward(args: argparse.Namespace) -> None:
    """Forward + backward over every weight: the cost of one full fine-tuning micro-batch, without the optimizer."""
    if args.dry_run:
        return dry_run(args)
    setup = build_setup(args.size, args.num_crops)
    dtype = DTYPES[args.dtype]
    print(f"## forward + backward, `--size {args.size}`\n\n{environment(args.device)}\n")
    errors: list[str] = []
    row: list[Any] = [args.size, args.dtype, args.batch, args.num_crops, args.attn]
    with out_of_memory_guard(errors):
        model = build_model(setup, dtype, args.device, args.attn, args.seed).train()
        model.config.use_cache = False
        batches = Batches(setup, synthetic_images(args.seed), args.batch, args.num_crops, args.device)
        reset_peak_memory(args.device)

        def step(i: int) -> None:
            loss, count = answer_loss(model, batches[i])
            (loss / max(count, 1)).backward()
            model.zero_grad(set_to_none=True)

        times = time_steps(step, args.warmup, args.iters, args.device)
        tokens = [batches.tokens(i) for i in range(args.warmup, args.warmup + args.iters)]
        row += [
            f"{statistics.mean(tokens):,.0f}",
            f"{1000 * statistics.median(times):,.1f}",
            f"{1000 * min(times):,.1f} / {1000 * max(times):,.1f}",
            f"{sum(tokens) / sum(times):,.0f}",
            peak_memory(args.device),
        ]
    if errors:
        row += [errors[0], "", "", "", peak_memory(args.device)]
    headers = ["size", "dtype", "batch", "crops", "attn", "tokens/step", "median ms", "min / max ms"]
    print(markdown_table([*headers, "tokens/s", "peak memory"], [row]))
    print(f"\n{args.warmup} warm-up + {args.iters} timed steps; {memory_note(args.device)}")


# ----------------------------------------------------------------------------------------------- train


def parse_matrix(spec: str) -> list[tuple[int, str, int]]:
    """``"1:eager:16,8:sdpa:4"`` -> [(1, "eager", 16), (8, "sdpa", 4)]: batch, attention, num_crops per row."""
    rows = []
    for item in spec.split(","):
        batch, attn, crops = item.strip().split(":")
        rows.append((int(batch), attn, int(crops)))
    return rows


def train_row(args: argparse.Namespace, batch: int, attn: str, crops: int, peak: float | None) -> list[Any]:
    """One row of the matrix; its model and optimizer are freed when it returns (or raises out of memory)."""
    setup = build_setup(args.size, crops)
    dtype = DTYPES[args.dtype]
    device_type = torch.device(args.device).type
    model = build_model(setup, dtype, args.device, attn, args.seed)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # before apply_method, as the training loop does
    model = apply_method(model, lora_config(args)).train()
    params = count_parameters(model)["total"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01)
    batches = Batches(setup, synthetic_images(args.seed), batch, crops, args.device)
    reset_peak_memory(args.device)

    def step(i: int) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, count = answer_loss(model, batches[i])
        (loss / max(count, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, args.warmup, args.iters, args.device)
    tokens = sum(batches.tokens(i) for i in range(args.warmup, args.warmup + args.iters))
    seconds = sum(times)
    tflops = 6 * params * tokens / seconds / 1e12
    return [
        f"{params:,}",
        f"{tokens / args.iters:,.0f}",
        f"{1000 * statistics.median(times):,.1f}",
        f"{batch * args.iters / seconds:,.2f}",
        f"{tokens / seconds:,.0f}",
        f"{tflops:.3g}",
        f"{100 * tflops / peak:.1f}%" if peak else "n/a (CPU)",
        peak_memory(args.device),
    ]


def run_train(args: argparse.Namespace) -> None:
    """LoRA training steps as the project trains: frozen base in ``--dtype``, bf16 autocast, AdamW on the adapters."""
    if args.dry_run:
        return dry_run(args)
    on_cuda = torch.device(args.device).type == "cuda"
    peak = args.peak_tflops or (H100_BF16_TFLOPS if on_cuda else None)
    print(f"## LoRA training steps, `--size {args.size}`\n\n{environment(args.device)}\n")
    table = []
    for batch, attn, crops in parse_matrix(args.matrix):
        errors: list[str] = []
        row: list[Any] = [batch, attn, crops]
        with out_of_memory_guard(errors):
            row += train_row(args, batch, attn, crops, peak)
        if errors:
            row += ["", errors[0], "", "", "", "", "", peak_memory(args.device)]
        table.append(row)
        free(args.device)
    headers = [
        "batch",
        "attn",
        "crops",
        "N (params)",
        "tokens/step",
        "median step ms",
        "samples/s",
        "tokens/s",
    ]
    print(markdown_table([*headers, "model TFLOP/s (6NT)", "MFU", "peak memory"], table))
    bf16 = args.dtype == "bf16"
    print(
        f"\n{args.dtype} base weights{', bf16 autocast' if bf16 else ''}, LoRA r {args.lora_r} alpha "
        f"{args.lora_alpha} on qkv_proj/o_proj/gate_up_proj/down_proj, AdamW; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {args.warmup} warm-up + {args.iters} timed steps per row"
        f"\nMFU = 6 * N * T / step time / peak; N = all parameters, LoRA included; T = non-padding tokens; "
        f"peak = {f'{peak:g} TFLOP/s' if peak else 'none given'}\n{memory_note(args.device)}"
    )


# ----------------------------------------------------------------------------------------------- generate


def force_length(model: Any, new_tokens: int, counts: list[int]) -> None:
    """Make ``model.generate`` produce exactly ``new_tokens`` per row (random weights stop anywhere) and count them."""
    original = model.generate

    def generate(*args: Any, generation_config: Any, **kwargs: Any) -> torch.Tensor:
        config = copy.deepcopy(generation_config)  # generate_answers' config, plus the minimum length
        config.min_new_tokens = new_tokens
        output = original(*args, generation_config=config, **kwargs)
        counts.append(output.shape[0] * (output.shape[1] - kwargs["input_ids"].shape[1]))
        return output

    model.generate = generate


def run_generate(args: argparse.Namespace) -> None:
    """Evaluation throughput: greedy answers with the project's generation loop, fixed answer length."""
    # Imported here: phivision.evaluate needs rapidfuzz, which the GPU machine's image lacks (the other
    # subcommands run without it).
    from phivision.answer.generate import generate_answers

    setup = build_setup(args.size, args.num_crops)
    print(f"## Batched greedy generation, `--size {args.size}`\n\n{environment(args.device)}\n")
    table = []
    images = synthetic_images(args.seed)
    pool = [images[i % len(images)] for i in range(args.images)]
    model = build_model(setup, DTYPES[args.dtype], args.device, args.attn, args.seed).eval()
    counts: list[int] = []
    force_length(model, args.max_new_tokens, counts)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        errors: list[str] = []
        row: list[Any] = [batch, args.images]
        with out_of_memory_guard(errors):
            kwargs = {"batch_size": batch, "max_new_tokens": args.max_new_tokens, "progress": False}
            generate_answers(model, setup.processor, pool[:batch], **kwargs)  # warm-up, untimed
            counts.clear()
            reset_peak_memory(args.device)
            sync(args.device)
            start = time.perf_counter()
            generate_answers(model, setup.processor, pool, **kwargs)
            sync(args.device)
            seconds = time.perf_counter() - start
            row += [
                f"{sum(counts) / args.images:g}",
                f"{seconds:,.2f}",
                f"{args.images / seconds:,.2f}",
                f"{sum(counts) / seconds:,.1f}",
                peak_memory(args.device),
            ]
        if errors:
            row += [errors[0], "", "", "", peak_memory(args.device)]
        table.append(row)
        free(args.device)
    headers = ["batch", "images", "new tokens/image", "seconds", "images/s", "new tokens/s", "peak memory"]
    print(markdown_table(headers, table))
    print(
        f"\n{args.dtype} weights, {args.attn}, num_crops {args.num_crops}, greedy, KV cache; every answer forced to "
        f"{args.max_new_tokens} new tokens (min_new_tokens = max_new_tokens); time includes preprocessing and "
        f"decoding; one untimed warm-up batch per row\n{memory_note(args.device)}"
    )


# ----------------------------------------------------------------------------------------------- precision


@torch.no_grad()
def run_precision(args: argparse.Namespace) -> None:
    """How far bf16 logits are from fp32 ones, same weights, on a left-padded batch of 2 prompts with images."""
    setup = build_setup(args.size, args.num_crops)
    images = synthetic_images(args.seed)
    pair = [images[0], images[4]]  # 800x800 and 1500x500: different grids, so one row is padded
    inputs = setup.processor(text=[prompt_text()] * 2, images=pair, padding_side="left")
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    valid = inputs["attention_mask"].bool()
    device_type = torch.device(args.device).type
    print(f"## bf16 vs fp32 logits, `--size {args.size}`\n\n{environment(args.device)}\n")
    table = []
    for attn in args.attn.split(","):
        reference = build_model(setup, torch.float32, args.device, attn, args.seed).eval()
        fp32 = reference(**inputs).logits[valid]
        bf16_model = build_model(setup, torch.bfloat16, args.device, attn, args.seed).eval()
        bf16_model.load_state_dict(reference.state_dict())  # the same weights, rounded to bf16
        variants = {"bf16 weights": lambda m=bf16_model: m(**inputs).logits}

        def autocast(m: Any = reference) -> torch.Tensor:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return m(**inputs).logits

        variants["fp32 weights + bf16 autocast"] = autocast
        for name, forward in variants.items():
            other = forward()[valid].float()
            diff = other - fp32
            table.append(
                [
                    attn,
                    name,
                    f"{(diff.norm() / fp32.norm()).item():.3e}",
                    f"{diff.abs().max().item():.3e}",
                    f"{fp32.abs().max().item():.3e}",
                    f"{100 * (other.argmax(-1) == fp32.argmax(-1)).float().mean().item():.1f}%",
                ]
            )
        del reference, bf16_model
        free(args.device)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    headers = [
        "attn",
        "compared with fp32",
        "rel. error",
        "max abs diff",
        "max abs fp32 logit",
        "argmax same",
    ]
    print(markdown_table(headers, table))
    print(
        f"\nbatch of 2, left-padded: {lengths[0]} and {lengths[1]} tokens ({int((~valid).sum())} padding), images "
        f"{IMAGE_SIZES[0][0]}x{IMAGE_SIZES[0][1]} and {IMAGE_SIZES[4][0]}x{IMAGE_SIZES[4][1]} at num_crops "
        f"{args.num_crops}, random weights (seed {args.seed}); over the {int(valid.sum())} non-padding positions: "
        "rel. error = L2 norm of (logits - fp32 logits) / L2 norm of fp32 logits, argmax same = share of positions "
        "whose top token agrees"
    )


# ----------------------------------------------------------------------------------------------- perf


LAYOUTS = {"padded8": (8, False), "packed8": (8, True), "batch1": (1, False)}  # rows per step, packed


@dataclass(frozen=True)
class PerfRow:
    """One row of the ``perf`` matrix: batch layout, attention, crops, which logits, Liger."""

    layout: str
    attn: str
    crops: int
    answer_only: bool
    liger: bool

    @property
    def label(self) -> str:
        logits = "answer" if self.answer_only else "all"
        return f"{self.layout}:{self.attn}:{self.crops}:{logits}:{'on' if self.liger else 'off'}"


def default_perf_matrix() -> str:
    rows = []
    for crops in (16, 4):
        rows += [
            f"padded8:sdpa:{crops}:all:off",  # the trainer as it was: padded batch 8, every position's logits
            f"padded8:sdpa:{crops}:answer:off",
            f"packed8:auto:{crops}:answer:off",
            f"packed8:auto:{crops}:answer:on",
            f"padded8:sdpa:{crops}:answer:on",
            f"batch1:eager:{crops}:all:off",  # the cookbook's recipe: batch 1, eager attention
            f"batch1:eager:{crops}:answer:off",
        ]
    return ",".join(rows)


def parse_perf_matrix(spec: str) -> list[PerfRow]:
    """``"padded8:sdpa:16:all:off,packed8:auto:4:answer:on"`` -> rows (layout:attn:crops:logits:liger)."""
    rows = []
    for item in spec.split(","):
        layout, attn, crops, logits, liger = item.strip().split(":")
        if layout not in LAYOUTS or logits not in ("all", "answer") or liger not in ("on", "off"):
            raise SystemExit(
                f"--matrix: bad row {item!r} (layout {sorted(LAYOUTS)}, logits all|answer, liger on|off)"
            )
        rows.append(PerfRow(layout, attn, int(crops), logits == "answer", liger == "on"))
    return rows


def resolve_attn(attn: str, device: str) -> str:
    """``auto``: FlashAttention-2 (varlen for packed rows) where flash-attn and CUDA are there, else SDPA."""
    if attn != "auto":
        return attn
    import importlib.util

    on_cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


@contextlib.contextmanager
def phi3_module_restored() -> Iterator[None]:
    """Undo Liger's module-wide patches of transformers' Phi-3 code after a row, so later rows run without them."""
    from transformers.models.phi3 import modeling_phi3

    names = ("apply_rotary_pos_emb", "Phi3RMSNorm", "Phi3MLP")
    saved = {name: getattr(modeling_phi3, name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(modeling_phi3, name, value)


def liger_unavailable(device: str) -> str | None:
    """Why Liger cannot run here (the project's own check), or None."""
    if torch.device(device).type != "cuda":
        return "n/a: Liger needs CUDA"
    try:
        require_liger(True)
    except PhivisionError as err:
        return "n/a: " + str(err).split(": ", 1)[-1][:60]
    return None


def perf_row(args: argparse.Namespace, row: PerfRow, peak: float | None) -> list[Any]:
    """Measure one row; its model and optimizer are freed when it returns (or raises out of memory)."""
    batch, packed = LAYOUTS[row.layout]
    setup = build_setup(args.size, row.crops)
    dtype = DTYPES[args.dtype]
    device_type = torch.device(args.device).type
    model = build_model(setup, dtype, args.device, resolve_attn(row.attn, args.device), args.seed)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if row.liger:
        apply_liger(model)  # before LoRA, as the training loop does
    model = apply_method(model, lora_config(args)).train()
    params = count_parameters(model)["total"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01)
    batches = Batches(setup, synthetic_images(args.seed), batch, row.crops, args.device, packed=packed)
    reset_peak_memory(args.device)

    def step(i: int) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, count = answer_loss(model, batches[i], answer_only=row.answer_only)
        (loss / max(count, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, args.warmup, args.iters, args.device)
    timed = range(args.warmup, args.warmup + args.iters)
    tokens = sum(batches.tokens(i) for i in timed)
    positions = sum(batches.positions(i) for i in timed)
    seconds = sum(times)
    tflops = 6 * params * tokens / seconds / 1e12
    return [
        f"{tokens / args.iters:,.0f}",
        f"{100 * (positions - tokens) / positions:.1f}%",
        f"{1000 * statistics.median(times):,.1f}",
        f"{batch * args.iters / seconds:,.2f}",
        tokens / seconds,
        f"{tflops:.3g}",
        f"{100 * tflops / peak:.1f}%" if peak else "n/a (CPU)",
        peak_memory(args.device),
    ]


def run_perf(args: argparse.Namespace) -> None:
    """Issue 9's matrix: padded batch 8 vs packed vs batch 1 eager, answer-only logits and Liger on and off."""
    rows = parse_perf_matrix(args.matrix)
    if args.dry_run:
        return perf_dry_run(args, rows)
    on_cuda = torch.device(args.device).type == "cuda"
    peak = args.peak_tflops or (H100_BF16_TFLOPS if on_cuda else None)
    print(f"## Training performance matrix, `--size {args.size}`\n\n{environment(args.device)}\n")
    started = time.perf_counter()
    baseline: dict[int, float] = {}
    headers = ["layout", "attn", "crops", "logits", "liger", "tokens/step", "padding", "median step ms"]
    headers += ["samples/s", "tokens/s", "tokens/s vs first row", "model TFLOP/s (6NT)", "MFU", "peak memory"]
    print(markdown_table(headers, []), flush=True)  # rows follow as they finish, so a timeout keeps them
    for row in rows:
        cells: list[Any] = [row.layout, resolve_attn(row.attn, args.device), row.crops]
        cells += ["answer" if row.answer_only else "all", "on" if row.liger else "off"]
        reason = liger_unavailable(args.device) if row.liger else None
        if time.perf_counter() - started > args.budget_s:
            reason = f"skipped: past the {args.budget_s:g} s budget"
        errors: list[str] = []
        result: list[Any] = []
        if reason is None:
            with out_of_memory_guard(errors), phi3_module_restored():
                result = perf_row(args, row, peak)
        if reason or errors:
            result = [
                reason or errors[0],
                "",
                "",
                "",
                None,
                "",
                "",
                peak_memory(args.device) if errors else "",
            ]
        tokens_per_s = result[4]
        if tokens_per_s is not None:
            baseline.setdefault(row.crops, tokens_per_s)
        ratio = f"{tokens_per_s / baseline[row.crops]:.2f}x" if tokens_per_s and row.crops in baseline else ""
        result[4] = f"{tokens_per_s:,.0f}" if tokens_per_s is not None else ""
        print(
            markdown_table(headers, [cells + result[:5] + [ratio] + result[5:]]).splitlines()[-1], flush=True
        )
        free(args.device)
        print(f"  done {row.label} after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(
        f"\n{args.dtype} base weights{', bf16 autocast' if args.dtype == 'bf16' else ''}, LoRA r {args.lora_r} alpha {args.lora_alpha} on "
        f"qkv_proj/o_proj/gate_up_proj/down_proj, AdamW; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {args.warmup} warm-up + {args.iters} timed steps per "
        f"row; total {time.perf_counter() - started:.0f} s\n"
        "layouts: padded8 = 8 samples right-padded; packed8 = the same 8 samples in one padding-free row; batch1 = "
        "one sample per step. logits: all = the LM head on every position, answer = only where the next token is "
        "labelled. tokens = non-padding tokens; padding = share of computed positions that are padding; "
        "'tokens/s vs first row' compares with the matrix's first measured row of the same crops\n"
        f"MFU = 6 * N * T / step time / peak; N = all parameters, LoRA included; T = non-padding tokens; "
        f"peak = {f'{peak:g} TFLOP/s' if peak else 'none given'}\n{memory_note(args.device)}"
    )


def perf_dry_run(args: argparse.Namespace, rows: list[PerfRow]) -> None:
    """Full size on the meta device: build and wrap the model, make every row's batch, print its sizes."""
    args.command = "train"  # the parameter table with LoRA
    dry_run(args)
    vocab = build_setup(args.size, rows[0].crops).config.vocab_size
    table = []
    for row in rows:
        batch, packed = LAYOUTS[row.layout]
        setup = build_setup(args.size, row.crops)
        batches = Batches(setup, synthetic_images(args.seed), batch, row.crops, "cpu", packed=packed)
        inputs = batches[0]
        answer = int((inputs["labels"][:, 1:] != -100).sum())
        positions = inputs["input_ids"].numel()
        logit_rows = answer if row.answer_only else positions
        table.append(
            [
                row.label,
                resolve_attn(row.attn, args.device),
                "x".join(str(d) for d in inputs["input_ids"].shape),
                f"{batches.tokens(0):,}",
                f"{positions:,}",
                answer,
                f"{2 * logit_rows * vocab * 4 / 2**30:.2f} GiB",
                liger_unavailable(args.device) or "usable" if row.liger else "off",
            ]
        )
    print(f"\n### The `perf` matrix, first batch of each row (synthetic photos, `--size {args.size}`)\n")
    headers = ["row", "attn here", "input_ids", "tokens", "positions", "answer tokens", "fp32 logits + grad"]
    print(markdown_table([*headers, "liger here"], table))


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], None], size: str, help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=func.__doc__)
        p.set_defaults(func=func)
        p.add_argument("--size", choices=SIZES, default=size, help=f"model size (default {size})")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--seed", type=int, default=0)
        return p

    forward = add("forward", run_forward, "full", "forward + backward over all weights")
    forward.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    forward.add_argument("--batch", type=int, default=4)
    forward.add_argument("--num-crops", type=int, default=16)
    forward.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")

    train = add("train", run_train, "full", "LoRA training throughput and MFU")
    train.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    train.add_argument(
        "--matrix",
        default="1:eager:16,1:eager:4,8:sdpa:16,8:sdpa:4",
        help="rows batch:attn:num_crops, comma-separated (default: %(default)s)",
    )
    train.add_argument("--num-crops", type=int, default=16, help="for --dry-run only")
    train.add_argument("--lora-r", type=int, default=64, help="default as configs/lora.yaml")
    train.add_argument("--lora-alpha", type=int, default=128)
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--peak-tflops", type=float, default=None, help="default 989 (H100 SXM bf16) on CUDA")

    for p in (forward, train):
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--iters", type=int, default=10)
        p.add_argument(
            "--dry-run", action="store_true", help="build on the meta device, print sizes and FLOPs"
        )
    forward.set_defaults(peak_tflops=None)  # used by --dry-run

    generate = add("generate", run_generate, "full", "greedy generation throughput")
    generate.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    generate.add_argument("--batch-sizes", default="1,16")
    generate.add_argument("--images", type=int, default=32)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--num-crops", type=int, default=16)
    generate.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")

    perf = add("perf", run_perf, "full", "issue 9 matrix: padded vs packed vs batch 1, logits, Liger")
    perf.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    perf.add_argument(
        "--matrix",
        default=default_perf_matrix(),
        help="rows layout:attn:crops:logits:liger, comma-separated; layout padded8|packed8|batch1, attn "
        "sdpa|eager|flash_attention_2|auto, logits all|answer, liger on|off (default: 7 rows each at 16 and 4 crops)",
    )
    perf.add_argument("--num-crops", type=int, default=16, help="for --dry-run's token table only")
    perf.add_argument("--lora-r", type=int, default=64, help="default as configs/lora.yaml")
    perf.add_argument("--lora-alpha", type=int, default=128)
    perf.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="gradient checkpointing is on by default, as in configs/lora.yaml",
    )
    perf.add_argument(
        "--peak-tflops", type=float, default=None, help="default 989 (H100/H200 SXM bf16) on CUDA"
    )
    perf.add_argument("--warmup", type=int, default=2)
    perf.add_argument("--iters", type=int, default=5)
    perf.add_argument(
        "--budget-s", type=float, default=420, help="start no new row after this many seconds (default 420)"
    )
    perf.add_argument("--dry-run", action="store_true", help="build on the meta device, print sizes per row")

    precision = add("precision", run_precision, "tiny", "bf16 vs fp32 logits")
    precision.add_argument("--num-crops", type=int, default=16)
    precision.add_argument("--attn", default="sdpa,eager", help="comma-separated (default: %(default)s)")

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
