"""phivision against the recipe users would pick instead: the Phi-3 cookbook's fine-tuning of the official remote
code, side by side on the same checkpoint, data and steps.

    python benchmarks/bench_vs_official.py                      # CPU: 2 steps at 1 crop, 3 interleaved repeats
    python benchmarks/bench_vs_official.py --device cuda --num-crops 16 --steps 20

Both sides train the same mid-size stand-in (the real config, tokenizer and CLIP geometry: 336 px tiles, patch 14,
width 1024; here 3 CLIP layers and a 256-wide, 2-layer decoder; float32 on a CPU) with the same LoRA (phivision's
defaults: r 16, alpha 32, the four Phi-3 projections), from the same initial adapter weights, for the same steps
over the same examples in the same order, at the same learning rates. LoRA dropout is 0 on both sides so that
both compute the same function: the final losses then agree to float precision, and the speed ratio compares
like with like.

* official: the cookbook's recipe on Microsoft's code, in the oracle environment (transformers 4.48, built and
  cached by tests/serve/standalone_env.py): batch 1 with gradient accumulation over phivision's batch, eager
  attention, the model's own loss over every position's logits (benchmarks/official_recipe.py);
* phivision: its training loop with its defaults (batch 4 grouped by length, SDPA, answer-only logits, CLIP on
  the tiles an image uses), timed over ``Recipe.fit``.

Each side runs in a fresh process per repeat, alternating, with the same number of threads; samples/s and
tokens/s (every input position, image positions included) cover the training steps only (model loading and the
final evaluation are left out); peak memory is the process's peak RSS (started with ``MALLOC_MMAP_THRESHOLD_`` so
that freed tensors return to the system), or the peak CUDA allocation on a GPU. Heavy: run it under
``flock /work/wt/.heavy.lock`` on a shared machine.

On a GPU machine without package-index access the oracle environment cannot be built there; carry the wheels of
tests/serve/standalone_env.py's ORACLE overlay and its torch, and point pip at them (``PIP_NO_INDEX=1
PIP_FIND_LINKS=DIR``).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serve"))
sys.path.insert(0, str(ROOT / "tests" / "oracle"))

from oracle_setup import REFERENCE_NAME, shared_reference  # noqa: E402
from standalone_env import ORACLE, clean_env  # noqa: E402

# The checkpoint: real CLIP geometry with 3 layers, a 256 x 2 decoder, the real vocabulary and tokenizer.
MODEL = {
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 704,
    "vision": {"num_hidden_layers": 3},
}
OFFICIAL_SCRIPT = Path(__file__).with_name("official_recipe.py")


# ------------------------------------------------------------------------------------- phivision's side


def phivision_config(spec: dict):
    from phivision.train.config import load_config

    overrides = [
        f"schedule.max_steps={spec['steps']}",
        "lora.dropout=0.0",
        "eval.gen_samples=0",
        "tracking.log_every=1",
        f"precision={'bf16' if spec['dtype'] == 'bfloat16' else 'fp32'}",
        f"num_threads={spec['threads']}",
    ]
    return load_config(
        None, overrides, model=spec["checkpoint"], out=spec["run"], data={"path": spec["data"]}
    )


def run_phivision(spec: dict, out_path: Path) -> None:
    """In a fresh process: phivision's Recipe, timed over fit(); with ``prepare``, also write what the official
    side needs to see the same run (initial adapter, rows per step, learning rates)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from phivision.train.loop import Recipe, lr_factor

    config = phivision_config(spec)
    recipe = Recipe(config, progress=False)
    recipe.setup()
    model = recipe.accelerator.unwrap_model(recipe.model)
    plan, train_set, accum = recipe.plan, recipe.train_set, config.optim.grad_accum
    steps = [
        [i for micro in range(s * accum, (s + 1) * accum) for i in plan.global_batch_at(micro)]
        for s in range(recipe.total_steps)
    ]
    lengths = train_set.lengths()
    if spec.get("prepare"):
        initial = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(initial, spec["initial_adapter"])
        schedule = config.schedule
        rates = [
            config.optim.lr * lr_factor(s, recipe.total_steps, 0, schedule.decay, schedule.min_lr_ratio)
            for s in range(recipe.total_steps)
        ]

        def row(i: int) -> dict[str, str]:
            return {
                "image": str(train_set.root / train_set.rows.at[i, "image_path"]),
                "answer": train_set.answer(i),
            }

        plan_out = {
            "steps": [[row(i) for i in step] for step in steps],
            "learning_rates": rates,
            "prompt": train_set.prompt,
            "lora": {
                "r": config.lora.r,
                "alpha": config.lora.alpha,
                "dropout": config.lora.dropout,
                "target_modules": list(config.lora.target_modules),
            },
            "optim": {
                "lr": config.optim.lr,
                "betas": list(config.optim.betas),
                "eps": config.optim.eps,
                "weight_decay": config.optim.weight_decay,
                "grad_clip": config.optim.grad_clip,
            },
            "batch_size": config.data.batch_size,
        }
        Path(spec["plan"]).write_text(json.dumps(plan_out))
    start = time.perf_counter()
    recipe.fit()
    if torch.cuda.is_available() and spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(spec["run"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("type") == "train"]
    result = {
        "losses": losses,
        "seconds": seconds,
        "samples": sum(len(s) for s in steps),
        "tokens": sum(lengths[i] for s in steps for i in s),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "attn_implementation": config.attn_implementation,
        "batch_size": config.data.batch_size,
    }
    out_path.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------- the comparison


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def phivision_side(spec: dict, work: Path, repeat: int, prepare: bool) -> dict:
    spec = {**spec, "run": str(work / f"run-{repeat}"), "prepare": prepare}
    spec_path, out_path = work / f"phivision-{repeat}.json", work / f"phivision-{repeat}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, __file__, "_phivision", str(spec_path), str(out_path)],
        env=child_env(spec["threads"]),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"phivision side failed:\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def official_side(env, spec: dict, plan: dict, work: Path, repeat: int) -> dict:
    official_spec = {
        "checkpoint": spec["checkpoint"],
        "device": spec["device"],
        "dtype": spec["dtype"],
        "seed": 0,
        "initial_adapter": spec["initial_adapter"],
        **{k: plan[k] for k in ("steps", "learning_rates", "prompt", "lora", "optim")},
    }
    folder = work / f"official-{repeat}"
    result = env.run(
        OFFICIAL_SCRIPT, official_spec, folder, overlay=ORACLE, timeout=3600, threads=spec["threads"]
    )
    result["seconds"] = sum(result["step_seconds"])
    return result


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=2, help="optimizer steps per run (phivision's batch each)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of both sides")
    parser.add_argument("--rows", type=int, default=40, help="rows of the sample catalog")
    parser.add_argument("--num-crops", type=int, default=1, help="tiles per image (the real checkpoint: 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()

    import torch

    from phivision.data.sample import write_sample_catalog
    from phivision.model.standin import write_standin_checkpoint

    # glibc then serves every allocation above 64 KiB with its own mapping and returns it when freed: each child's
    # peak RSS follows its live tensors (set before any child starts; both sides inherit it).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    reference = shared_reference() / REFERENCE_NAME
    if not (reference / "official-code" / "modeling_phi3_v.py").is_file():
        raise SystemExit(
            f"{reference}/official-code not found: set PHIVISION_SHARED_REFERENCE to shared/reference"
        )
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vs-official-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, data = work / "standin", work / "data"
    if not checkpoint.exists():
        write_standin_checkpoint(
            checkpoint,
            reference,
            dtype=getattr(torch, args.dtype),
            num_crops=args.num_crops,
            official_code=True,
            **MODEL,
        )
    if not data.exists():
        write_sample_catalog(data, n=args.rows, seed=0)
    env = clean_env()
    env.overlay(ORACLE)
    spec = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "steps": args.steps,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "initial_adapter": str(work / "initial-adapter.safetensors"),
        "plan": str(work / "plan.json"),
    }
    print(f"# {args.steps} steps, {args.num_crops} crops, {args.device} {args.dtype}, {args.threads} threads")
    results: dict[str, list[dict]] = {"official": [], "phivision": []}
    for repeat in range(args.repeats):
        order = ["phivision", "official"] if repeat % 2 == 0 else ["official", "phivision"]
        for side in order:
            load = load_average()
            if side == "phivision":
                result = phivision_side(spec, work, repeat, prepare=repeat == 0)
            else:
                plan = json.loads(Path(spec["plan"]).read_text())
                result = official_side(env, spec, plan, work, repeat)
            result["load"] = load
            results[side].append(result)
            print(
                f"repeat {repeat} {side:9s}: {result['samples'] / result['seconds']:.3f} samples/s, "
                f"{result['tokens'] / result['seconds']:.0f} tokens/s, peak {result['peak_rss_gib']:.2f} GiB, "
                f"final loss {result['losses'][-1]:.7f} (load {load})",
                flush=True,
            )
    report(results, work)


def report(results: dict[str, list[dict]], work: Path) -> None:
    def median(side: str, key) -> float:
        return statistics.median(key(r) for r in results[side])

    rows = []
    for side in ("official", "phivision"):
        rows.append(
            (
                side,
                median(side, lambda r: r["samples"] / r["seconds"]),
                median(side, lambda r: r["tokens"] / r["seconds"]),
                median(side, lambda r: r["peak_rss_gib"]),
                results[side][0]["losses"][-1],
            )
        )
    print("\n| recipe | samples/s | tokens/s | peak RSS (GiB) | final loss |")
    print("|---|---:|---:|---:|---:|")
    for side, sps, tps, rss, loss in rows:
        print(f"| {side} | {sps:.3f} | {tps:.0f} | {rss:.2f} | {loss:.7f} |")
    (off, phi) = rows
    losses_off, losses_phi = results["official"][0]["losses"], results["phivision"][0]["losses"]
    gap = max(abs(a - b) for a, b in zip(losses_off, losses_phi, strict=True))
    print(
        f"\nphivision / official: {phi[1] / off[1]:.2f}x samples/s, {phi[3] / off[3]:.2f}x peak memory; "
        f"largest per-step loss difference {gap:.1e} over {len(losses_off)} steps"
    )
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_phivision":
        run_phivision(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
    else:
        main()
