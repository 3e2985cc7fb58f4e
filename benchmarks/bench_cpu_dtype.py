"""Is bfloat16 fast on this CPU? The measurement behind phivision's default dtype (``phivision.runs.default_dtype``).

    python benchmarks/bench_cpu_dtype.py matmul                         # seconds, no model
    flock /work/wt/.heavy.lock python benchmarks/bench_cpu_dtype.py model --checkpoint /work/scratch/full
    flock /work/wt/.heavy.lock python benchmarks/bench_cpu_dtype.py model --layers 8 --rounds 2

``matmul``: the decoder's linear layers as ``nn.Linear`` runs them (``F.linear``, weight [out, in]) on a prompt's
prefill (1024 positions) and on one decoding step (1 and 8 positions), in bfloat16, float16 and float32,
interleaved, median of ``--repeats``.

``merge``: does a short run's LoRA update survive bfloat16? A shrunk stand-in (real tokenizer and CLIP width, 2
decoder layers) with a random LoRA adapter whose B is scaled to mimic a short (1e-4) to a long (1e-1) run: the
relative error of the merged update in bf16 weights, and that of the update's effect on the logits (against
float32) with the adapter merged into bf16 weights and kept unmerged in float32 beside them.

``model``: the full-size stand-in (``phivision.model.standin``), one child process per dtype (a 4.2B model is never
held twice), interleaved bf16, fp32, bf16, fp32 for ``--rounds`` rounds: the load, one prefill forward of a 4-crop
photo prompt, and greedy generation of ``--new-tokens`` tokens (forced length), each timed, with the child's peak
RSS. A float32 child needs ~19 GB: it is skipped (and says so) when the machine has less available.
``--layers 8`` writes and uses a stand-in with the real widths and 8 of the 32 decoder layers instead (float32
~5 GB), for a machine shared with others; the ratio per decoder layer is the same.

Both print what the machine has (lscpu's bf16/AMX flags) and what phivision decides from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_full_size import available_gib, cpu_flags, measured, sample_photo  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")  # a property peft reads
FP32_NEEDS_GIB = 20.0  # 16.6 GB of float32 weights, the bf16 file pages and activations


def policy_line() -> str:
    import torch

    from phivision.runs import default_dtype, native_half_dtypes

    native = native_half_dtypes(torch.device("cpu"))
    flags = sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f or f == "avx512_fp16")
    decided = default_dtype(torch.bfloat16, native)
    return (
        f"cpu flags: {' '.join(flags) or '(no bf16/AMX flags)'}; native 16-bit dtypes: "
        f"{sorted(str(d).removeprefix('torch.') for d in native) or 'none'}; a bf16 checkpoint loads as "
        f"{str(decided).removeprefix('torch.')}"
    )


def bench_matmul(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    # (input rows, in features, out features), as nn.Linear computes them: F.linear(x, weight[out, in])
    shapes = {
        "prefill: 1024 positions x qkv_proj (3072 -> 9216)": (1024, 3072, 9216),
        "decode: 1 position x gate_up_proj (3072 -> 16384)": (1, 3072, 16384),
        "decode, batch 8: 8 positions x gate_up_proj": (8, 3072, 16384),
    }
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    times: dict[tuple[str, torch.dtype], list[float]] = {}
    inputs = {name: (torch.randn(m, k), torch.randn(n, k)) for name, (m, k, n) in shapes.items()}
    for _ in range(args.repeats):
        for name, (x, weight) in inputs.items():
            for dtype in dtypes:  # interleaved: load on a shared machine hits every dtype alike
                a, w = x.to(dtype), weight.to(dtype)
                F.linear(a, w)
                start = time.perf_counter()
                for _ in range(args.inner):
                    F.linear(a, w)
                times.setdefault((name, dtype), []).append((time.perf_counter() - start) / args.inner)
    print(policy_line())
    print(f"load average {os.getloadavg()[0]:.1f}; median of {args.repeats} x {args.inner} calls")
    print(f"{'F.linear':<52}{'float32':>11}{'bfloat16':>11}{'float16':>11}{'fp32/bf16':>11}")
    for name in shapes:
        med = {d: statistics.median(times[(name, d)]) * 1e3 for d in dtypes}
        print(
            f"{name:<52}{med[torch.float32]:>9.1f}ms{med[torch.bfloat16]:>9.1f}ms{med[torch.float16]:>9.1f}ms"
            f"{med[torch.float32] / med[torch.bfloat16]:>10.2f}x"
        )


def bench_merge(args: argparse.Namespace) -> None:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model

    from phivision.answer.prompt import PromptFormat, prompt_text
    from phivision.loading import merge_adapter
    from phivision.model.standin import SMALL, write_standin_checkpoint
    from phivision.runs import load_model

    reference = Path(__file__).resolve().parent.parent / "tests" / "reference" / "phi-3-vision-128k-instruct"
    work = Path(tempfile.mkdtemp())
    checkpoint = write_standin_checkpoint(work / "ckpt", reference, num_crops=1, **SMALL)
    base = {
        dtype: load_model(checkpoint, device="cpu", dtype=dtype).model for dtype in ("float32", "bfloat16")
    }
    processor = load_model(checkpoint, device="cpu").processor
    batch = processor(text=prompt_text(PromptFormat()), images=[sample_photo()], return_tensors="pt")

    def logits(model: torch.nn.Module) -> torch.Tensor:
        inputs = {**batch, "pixel_values": batch["pixel_values"].to(next(model.parameters()).dtype)}
        with torch.no_grad():
            return model(**inputs).logits.float()

    def adapted(dtype: str, scale: float) -> torch.nn.Module:
        model = load_model(checkpoint, device="cpu", dtype=dtype).model
        targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        torch.manual_seed(1)
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        )
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float() * (scale if "lora_B" in name else 1.0)
        return model.eval()

    reference_logits = {dtype: logits(model) for dtype, model in base.items()}
    print(f"load average {os.getloadavg()[0]:.1f}; shrunk stand-in, LoRA r 16 on the 4 decoder projections")
    print(f"{'B scale':>8}{'merge rel. error':>18}{'effect error, merged':>22}{'effect error, unmerged':>24}")
    for scale in (1e-4, 1e-3, 1e-2, 1e-1):
        exact = logits(adapted("float32", scale)) - reference_logits["float32"]
        unmerged = logits(adapted("bfloat16", scale)) - reference_logits["bfloat16"]
        merged_model, report = merge_adapter(adapted("bfloat16", scale), torch.bfloat16)
        merged = logits(merged_model) - reference_logits["bfloat16"]

        def error(effect: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return float((effect - exact).norm() / exact.norm())

        print(f"{scale:>8g}{report.relative_error:>18.3f}{error(merged):>22.3f}{error(unmerged):>24.3f}")


def child(args: argparse.Namespace) -> None:
    """One dtype, one process: load, prefill forward, forced-length greedy generation; JSON on stdout's last line."""
    import torch

    from phivision.answer.prompt import PromptFormat, prompt_text
    from phivision.model import Phi3VProcessor
    from phivision.runs import load_model

    result: dict[str, float | str] = {"dtype": args.dtype}
    start = time.perf_counter()
    loaded = load_model(args.checkpoint, device="cpu", dtype=args.dtype)
    result["load_s"] = time.perf_counter() - start
    model = loaded.model
    processor = Phi3VProcessor.from_pretrained(args.checkpoint, num_crops=args.num_crops)
    batch = processor(text=prompt_text(PromptFormat()), images=[sample_photo()], return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    result["prompt_tokens"] = int(batch["input_ids"].shape[1])
    with torch.no_grad():
        start = time.perf_counter()
        model(**batch)
        result["prefill_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=processor.pad_token_id,
        )
        result["generate_s"] = time.perf_counter() - start
    print(json.dumps(result))


def bench_model(args: argparse.Namespace) -> None:
    print(policy_line())
    if (
        args.layers
    ):  # the real widths (decoder, CLIP, vocabulary) with fewer decoder layers: float32 fits beside others
        import tempfile

        from phivision.model.standin import write_standin_checkpoint

        reference = (
            Path(__file__).resolve().parent.parent / "tests" / "reference" / "phi-3-vision-128k-instruct"
        )
        out = Path(tempfile.mkdtemp()) / f"standin-{args.layers}-layers"
        args.checkpoint = str(write_standin_checkpoint(out, reference, num_hidden_layers=args.layers))
        print(f"full-width stand-in with {args.layers} of 32 decoder layers: {args.checkpoint}")
    rows = []
    for round_index in range(args.rounds):
        for dtype in ("bfloat16", "float32"):
            if dtype == "float32" and available_gib() < FP32_NEEDS_GIB:
                print(
                    f"round {round_index + 1}: float32 skipped: {available_gib():.1f} GiB available, needs 20"
                )
                continue
            load = os.getloadavg()[0]
            command = [sys.executable, __file__, "child", "--checkpoint", args.checkpoint, "--dtype", dtype]
            command += ["--new-tokens", str(args.new_tokens), "--num-crops", str(args.num_crops)]
            run = measured(command)
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"child {dtype} failed with exit {run.returncode}")
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row.update(peak_gib=run.peak_rss / 2**30, anon_gib=run.peak_anon / 2**30, wall_s=run.wall_s)
            row.update(load_avg=load, round=round_index + 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        f"{'round':>5} {'dtype':<9}{'load':>8}{'prefill':>9}{'generate':>10}{'peak RSS':>10}{'load avg':>9}"
    )
    for row in rows:
        print(
            f"{row['round']:>5} {row['dtype']:<9}{row['load_s']:>7.1f}s{row['prefill_s']:>8.1f}s"
            f"{row['generate_s']:>9.1f}s{row['peak_gib']:>8.1f}GB{row['anon_gib']:>6.1f}GB{row['load_avg']:>9.1f}"
        )
    for key in ("prefill_s", "generate_s"):
        bf16 = [r[key] for r in rows if r["dtype"] == "bfloat16"]
        fp32 = [r[key] for r in rows if r["dtype"] == "float32"]
        if bf16 and fp32:
            print(f"{key}: float32 / bfloat16 = {statistics.median(fp32) / statistics.median(bf16):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    matmul = sub.add_parser("matmul", help="GEMM and GEMV per dtype, no model")
    matmul.add_argument("--repeats", type=int, default=5)
    matmul.add_argument("--inner", type=int, default=3)
    sub.add_parser("merge", help="a short run's LoRA update merged into bf16 weights, shrunk stand-in")
    model = sub.add_parser("model", help="full-size stand-in: load, prefill, generation per dtype")
    model.add_argument("--checkpoint", help="a full-size stand-in (phivision.model.standin)")
    model.add_argument(
        "--layers", type=int, default=0, help="instead: write one with this many decoder layers"
    )
    model.add_argument("--rounds", type=int, default=1)
    model.add_argument("--new-tokens", type=int, default=16)
    model.add_argument("--num-crops", type=int, default=4)
    one = sub.add_parser("child", help=argparse.SUPPRESS)
    one.add_argument("--checkpoint", required=True)
    one.add_argument("--dtype", required=True)
    one.add_argument("--new-tokens", type=int, default=16)
    one.add_argument("--num-crops", type=int, default=4)
    args = parser.parse_args()
    {"matmul": bench_matmul, "merge": bench_merge, "model": bench_model, "child": child}[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
