"""The whole path at the real size (4,146,621,440 parameters, bf16) on a CPU, one process per step, with the CLI.

    flock /work/wt/.heavy.lock python benchmarks/bench_full_size.py run --work /tmp/full-path
    flock /work/wt/.heavy.lock python benchmarks/bench_full_size.py run --checkpoint /work/scratch/full   # reuse

Steps (each its own process, so a 4.2B model is never held twice; wall time and the process's peak RSS from
``wait4``):

1. ``standin``: the real config, tokenizer and two-shard layout with random bf16 weights
   (``phivision.model.standin.write_standin_checkpoint``; skipped with ``--checkpoint``).
2. ``sample``: ``phivision sample --n 24`` (a val and a test split, even that small).
3. ``train``: ``phivision train`` LoRA, bf16, 4 crops, batch 1, on a handful of examples (``--train-samples``)
   for ``--steps`` steps at a constant learning rate: the loss must fall (the last steps' mean below the first's).
4. ``evaluate``: ``phivision evaluate --limit N``: constrained answers over the real 32,011-id vocabulary.
5. ``export``: ``phivision export`` (bf16, the base's dtype): the shard files, and how much of the LoRA update
   survived the rounding (``phivision.json``'s ``merge``).
6. ``greedy``: phivision loads the export and answers ``--images`` photos greedily (unconstrained, batch 1).
7. ``clean``: a virtual environment WITHOUT phivision (``tests/serve/standalone_env.py``, built once and cached)
   loads the export with ``trust_remote_code=True`` and answers the same photos: the tokens must be equal.
8. ``predict``: ``phivision predict`` on the same photos.
9. ``serve``: ``phivision serve``, one OpenAI chat request (the official ``openai`` client), then stopped.

Prints a table (wall time, peak RSS, what each step found) and writes it as JSON to ``WORK/results.json``.
Top-level imports are the standard library only: the ``clean`` child runs this file where phivision is absent.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.abc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "reference" / "phi-3-vision-128k-instruct"


# ------------------------------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    """One child process: exit status, wall time, peak memory (bytes) and its output.

    ``peak_rss`` is the kernel's high-water mark (``wait4``'s ``ru_maxrss``, as ``/usr/bin/time -v`` reports it).
    It counts the pages of memory-mapped files too: transformers maps the safetensors shards and a bf16 model
    loaded in bf16 keeps many weights as views of those pages (page cache the kernel can drop and reread), so
    ``peak_anon`` (the most anonymous memory, sampled every 0.2 s from /proc: what the process itself allocated)
    is the figure that competes with other processes for RAM.
    """

    returncode: int
    wall_s: float
    peak_rss: int
    peak_anon: int
    stdout: str
    stderr: str
    extra: dict[str, Any] = field(default_factory=dict)


def measured(
    command: list[str],
    env: dict[str, str] | None = None,
    during: Callable[[subprocess.Popen], dict[str, Any]] | None = None,
    cwd: Path | None = None,
) -> Measured:
    """Run ``command`` to its end (or, with ``during``, until ``during(process)`` returns, then SIGINT it) and
    measure it. Output goes through temporary files, so a chatty child can never block on a full pipe."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        sampler = AnonSampler(process.pid)
        sampler.start()
        extra: dict[str, Any] = {}
        try:
            if during is not None:
                extra = during(process)
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
        except BaseException:
            process.kill()
            raise
        finally:
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            sampler.stop.set()
            sampler.join()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        peak = usage.ru_maxrss * 1024
        return Measured(process.returncode, wall, peak, sampler.peak, out.read(), err.read(), extra)


class AnonSampler(threading.Thread):
    """The largest sum of RssAnon over a process and its descendants, sampled every 0.2 s from /proc."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, sum(_anon_bytes(pid) for pid in _tree(self.pid)))


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the task ended meanwhile
                queue.extend(int(child) for child in task.read_text().split())
    return found


def _anon_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_gib() -> float:
    """MemAvailable of /proc/meminfo, in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty off Linux x86)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def sample_photo(index: int = 0) -> Any:
    """A synthetic product photo (``phivision sample``'s drawing), different for each ``index``."""
    import random

    from phivision.data.sample import draw_product, sample_products

    product = sample_products(index + 1, seed=index)[index]
    attributes = [product[k] for k in ("category", "color", "pattern", "material", "size")]
    return draw_product(*attributes, canvas=product["canvas"], rng=random.Random(product["draw_seed"]))


# -------------------------------------------------------------------------------------------------- children


def write_standin(args: argparse.Namespace) -> None:
    import torch

    from phivision.model.standin import SMALL, write_standin_checkpoint

    overrides = SMALL if args.small else {}  # --small: the same path on a shrunk stand-in, to try the script
    write_standin_checkpoint(
        args.out, REFERENCE, dtype=torch.bfloat16, seed=0, num_crops=args.num_crops, **overrides
    )


def phivision_greedy(args: argparse.Namespace) -> None:
    """phivision's answer for each photo: its generation loop, greedy, unconstrained, one photo at a time."""
    from PIL import Image

    from phivision.answer.generate import generate_completions
    from phivision.answer.prompt import prompt_text
    from phivision.runs import load_model

    loaded = load_model(args.model, device=args.device)
    rows = []
    for path in args.images:
        tokens: list[int] = []
        collect = tokens.append
        completion = generate_completions(
            loaded.model,
            loaded.processor,
            [Image.open(path).convert("RGB")],
            loaded.prompt,
            batch_size=1,
            max_new_tokens=args.new_tokens,
            progress=False,
            on_token=lambda _, token, collect=collect: collect(token),
        )[0]
        rows.append({"image": path, "tokens": tokens, "text": completion.text})
    result = {"prompt": prompt_text(loaded.prompt), "dtype": str(loaded.model.dtype), "rows": rows}
    print(json.dumps({**result, "stop_ids": [int(t) for t in loaded.processor.stop_token_ids]}))


class BlockPhivision(importlib.abc.MetaPathFinder):
    """Make ``import phivision`` fail in this process, as where it is not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "phivision" or name.startswith("phivision."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the export must load without it)")


def clean_greedy(args: argparse.Namespace) -> None:
    """Without phivision: transformers' Auto* classes with the export's own code, greedy, batch 1."""
    sys.meta_path.insert(0, BlockPhivision())
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    spec = json.loads(Path(args.spec).read_text())
    dtype = getattr(torch, spec["dtype"].removeprefix("torch."))  # the dtype phivision answered in
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
    model = model.to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    rows = []
    for row in spec["rows"]:
        image = Image.open(row["image"]).convert("RGB")
        batch = processor(text=spec["prompt"], images=[image], return_tensors="pt").to(args.device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.no_grad():
            ids = model.generate(
                **batch,
                do_sample=False,
                num_beams=1,
                max_new_tokens=args.new_tokens,
                eos_token_id=spec["stop_ids"],
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        rows.append(ids[0, batch["input_ids"].shape[1] :].tolist())
    print(
        json.dumps({"transformers": transformers.__version__, "model": type(model).__module__, "rows": rows})
    )


# ------------------------------------------------------------------------------------------------- the path


@dataclass
class Step:
    name: str
    command: str
    run: Measured
    load_avg: float
    found: str


def phivision_cli() -> list[str]:
    """The ``phivision`` command: the installed script, or the CLI module run from a checkout (PYTHONPATH=src)."""
    found = shutil.which("phivision")
    return [found] if found else [sys.executable, "-c", "from phivision.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunFiles:
    """The files of one benchmark run under WORK."""

    def __init__(self, work: Path, checkpoint: str | None) -> None:
        self.work = work
        self.checkpoint = Path(checkpoint) if checkpoint else work / "standin"
        self.data = work / "data"
        self.run = work / "run"
        self.export = work / "export"
        self.photos = work / "photos"


def run_path(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work}: not empty (every step writes a fresh directory there)")
    work.mkdir(parents=True, exist_ok=True)
    paths = RunFiles(work, args.checkpoint)
    cli = phivision_cli()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    steps: list[Step] = []
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {os.cpu_count()} CPUs, {available_gib():.1f} GiB available")

    def step(name: str, command: list[str], check: Callable[[Measured], str], **kwargs: Any) -> Measured:
        shown = " ".join(str(c) for c in command).replace(" ".join(cli), "phivision")
        shown = shown.replace(sys.executable, "python")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shown}", flush=True)
        load = os.getloadavg()[0]
        run = measured([str(c) for c in command], env=kwargs.pop("env", env), **kwargs)
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-6000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"step {name} failed with exit {run.returncode}")
        found = check(run)
        steps.append(Step(name, shown, run, load, found))
        memory = f"peak RSS {run.peak_rss / 1e9:.2f} GB (anonymous {run.peak_anon / 1e9:.2f} GB)"
        print(f"    {run.wall_s:.1f} s, {memory}: {found}", flush=True)
        _write_results(work, steps)
        if name == args.until:
            raise LastStep
        return run

    with contextlib.suppress(LastStep):  # --until: the steps after it are not run
        _run_steps(args, paths, cli, env, step)
    _print_table(steps)


class LastStep(Exception):
    """Raised after the step ``--until`` names."""


def _run_steps(
    args: argparse.Namespace, paths: RunFiles, cli: list[str], env: dict[str, str], step: Callable
) -> None:
    work = paths.work

    if args.checkpoint is None:
        step(
            "standin",
            [sys.executable, __file__, "standin", "--out", paths.checkpoint, "--num-crops", args.num_crops]
            + (["--small"] if args.small else []),
            lambda _: _describe_checkpoint(paths.checkpoint),
        )
        if args.shared_weights:
            print(f"    {_link_identical_shards(paths.checkpoint, Path(args.shared_weights))}", flush=True)

    step(
        "sample",
        [*cli, "sample", "--out", paths.data, "--n", 24, "--seed", 0],
        lambda run: run.stdout.strip().splitlines()[-1] + f"; splits {_split_counts(paths.data)}",
    )
    overrides = [
        "method=lora",
        "precision=bf16",
        f"num_crops={args.num_crops}",
        "data.batch_size=1",
        f"data.max_train_samples={args.train_samples}",
        f"schedule.max_steps={args.steps}",
        "schedule.decay=constant",
        f"optim.lr={args.lr}",
        "eval.max_samples=1",
        "eval.gen_samples=0",
        "tracking.log_every=1",
        f"attn_implementation={args.attn}",
        *args.train_overrides,
    ]
    step(
        "train",
        [*cli, "train", "--data", paths.data, "--model", paths.checkpoint, "--out", paths.run, *overrides],
        lambda _: _loss_trend(paths.run, args.train_samples),
    )
    step(
        "evaluate",
        [
            *cli, "evaluate", "--model", paths.run, "--data", paths.data, "--out", paths.run / "eval" / "after",
            "--split", "val", "--limit", args.eval_items, "--batch-size", 1,
        ],
        lambda _: _eval_summary(paths.run / "eval" / "after" / "metrics.json"),
    )  # fmt: skip
    step(
        "export",
        [*cli, "export", "--run", paths.run, "--out", paths.export, *args.export_args],
        lambda run: _export_summary(paths.export, run.stderr),
    )

    paths.photos.mkdir(exist_ok=True)
    images = []
    for i in range(args.images):
        photo = paths.photos / f"photo-{i}.jpg"
        write_photo(photo, i)
        images.append(str(photo))
    greedy = step(
        "greedy",
        [
            sys.executable,
            __file__,
            "greedy",
            "--model",
            paths.export,
            "--new-tokens",
            args.new_tokens,
            "--device",
            args.device,
            "--images",
        ]
        + images,
        lambda run: _greedy_summary(json.loads(run.stdout.strip().splitlines()[-1])),
    )
    ours = json.loads(greedy.stdout.strip().splitlines()[-1])
    spec = work / "greedy.json"
    spec.write_text(json.dumps(ours))

    if "clean" not in args.skip:
        python, clean_vars = clean_python(args.clean_python, env, work)
        step(
            "clean",
            [
                python,
                __file__,
                "clean",
                "--model",
                paths.export,
                "--spec",
                spec,
                "--new-tokens",
                args.new_tokens,
            ]
            + ["--device", args.device],
            lambda run: _compare_tokens(ours, json.loads(run.stdout.strip().splitlines()[-1])),
            env=clean_vars,
            cwd=work,
        )
    if "predict" not in args.skip:
        step(
            "predict",
            [*cli, "predict", *images, "--model", paths.export, "--out", work / "predictions.jsonl"],
            lambda _: _predict_summary(work / "predictions.jsonl"),
        )
    if "serve" not in args.skip:
        port = free_port()
        step(
            "serve",
            [*cli, "serve", "--model", paths.export, "--port", port],
            lambda run: run.extra["found"],
            during=lambda process: _one_request(process, port, images[0], args.serve_timeout),
        )


def clean_python(kind: str, env: dict[str, str], work: Path) -> tuple[str, dict[str, str]]:
    """The interpreter that loads the export without phivision, and its environment.

    ``venv``: a virtual environment without phivision (tests/serve/standalone_env.py, built once from the wheels
    pip can reach, then cached). ``same``: this interpreter with ``import phivision`` blocked (BlockPhivision),
    for machines that cannot build a venv (no package index, e.g. the GPU machine).
    """
    isolated = {
        k: v for k, v in env.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "HF_", "TRANSFORMERS_"))
    }
    isolated.update(HF_HOME=str(work / "hf-home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if kind == "same":
        return sys.executable, isolated
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from standalone_env import clean_env

    started = time.perf_counter()
    venv = clean_env()
    print(f"    clean venv {venv.root} ready in {time.perf_counter() - started:.0f} s", flush=True)
    return str(venv.python), {**isolated, "PYTHONNOUSERSITE": "1"}


def write_photo(path: Path, index: int) -> None:
    """A product photo written by a short child process (drawing needs phivision, this process stays light)."""
    if path.exists():
        return
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench_full_size import sample_photo; "
        "sample_photo(int(sys.argv[2])).save(sys.argv[3], quality=90)"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(index), str(path)], check=True
    )


def _describe_checkpoint(path: Path) -> str:
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return f"{len(shards)} shards, {size / 1e9:.2f} GB"


def _link_identical_shards(written: Path, shared: Path) -> str:
    """Replace each shard file of ``written`` that is byte-identical to ``shared``'s by a link to it: the later
    steps read the same bytes, and the disk need not hold the stand-in and the export's copy of it at once."""
    linked, differ = [], []
    for shard in sorted(written.glob("*.safetensors")):
        twin = shared / shard.name
        if twin.is_file() and subprocess.run(["cmp", "-s", shard, twin]).returncode == 0:
            shard.unlink()
            shard.symlink_to(twin.resolve())
            linked.append(shard.name)
        else:
            differ.append(shard.name)
    return f"identical to {shared}, now links: {linked}; differing (kept): {differ}"


def _split_counts(data: Path) -> str:
    report = json.loads((data / "prepare_report.json").read_text())
    return ", ".join(f"{n} {s}" for s, n in report["splits"].items())


def _loss_trend(run: Path, samples: int) -> str:
    losses = [
        r["loss"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r.get("type") == "train"
    ]
    first, last = losses[:samples], losses[-samples:]
    mean_first, mean_last = sum(first) / len(first), sum(last) / len(last)
    verdict = "falls" if mean_last < mean_first else "DOES NOT FALL"
    shown = " ".join(f"{x:.3f}" for x in losses)
    return f"loss {verdict}: first {mean_first:.3f} -> last {mean_last:.3f} (steps: {shown})"


def _eval_summary(path: Path) -> str:
    metrics = json.loads(path.read_text())
    return (
        f"{metrics['n']} items, constraint {metrics['constraint']}, parse rate {metrics.get('parse_rate')}, "
        f"max_new_tokens {metrics['max_new_tokens']}"
    )


def _export_summary(export: Path, stderr: str) -> str:
    info = json.loads((export / "phivision.json").read_text())
    merge = info.get("merge") or {}
    shards = sorted(p.name for p in export.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in export.glob("*.safetensors"))
    warned = "warned" if "warning:" in stderr else "no warning"
    attn = "_attn_implementation" in json.loads((export / "config.json").read_text())
    return (
        f"{len(shards)} shard files, {size / 1e9:.2f} GB; merged {merge.get('tensors')} tensors into "
        f"{merge.get('dtype')}: update relative error {merge.get('update_relative_error', float('nan')):.3g} "
        f"({warned}); config.json {'KEEPS' if attn else 'has no'} _attn_implementation"
    )


def _greedy_summary(result: dict) -> str:
    return f"{len(result['rows'])} answers in {result['dtype']}: " + " | ".join(
        repr(r["text"][:40]) for r in result["rows"]
    )


def _compare_tokens(ours: dict, theirs: dict) -> str:
    equal = 0
    for row, other in zip(ours["rows"], theirs["rows"], strict=True):
        mine = row["tokens"]
        cut = next((i for i, t in enumerate(mine) if t in ours["stop_ids"]), len(mine))
        equal += mine[: cut + 1] == other[: cut + 1]
    return (
        f"transformers {theirs['transformers']} ({theirs['model'].split('.')[0]}...): greedy tokens equal on "
        f"{equal} of {len(ours['rows'])} photos"
    )


def _predict_summary(path: Path) -> str:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return f"{len(records)} records: " + " | ".join(
        f"{r.get('category')!r} {r.get('price')!r}" for r in records
    )


def _one_request(process: subprocess.Popen, port: int, image: str, timeout: float) -> dict[str, Any]:
    """Wait for /healthz, send one chat request with the official openai client, and report."""
    import urllib.request

    from openai import OpenAI

    started = time.perf_counter()
    while True:
        if process.poll() is not None:
            return {"found": f"server exited with {process.returncode} before it was ready"}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.perf_counter() - started > timeout:
            return {"found": f"not ready after {timeout:.0f} s"}
        time.sleep(2)
    ready = time.perf_counter() - started
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=timeout)
    data = base64.b64encode(Path(image).read_bytes()).decode()
    asked = time.perf_counter()
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
                    {"type": "text", "text": "What is shown in this image?"},
                ],
            }
        ],
        max_tokens=48,
    )
    answer = reply.choices[0].message.content
    return {
        "found": f"ready in {ready:.0f} s; one request {time.perf_counter() - asked:.1f} s, "
        f"finish_reason {reply.choices[0].finish_reason}, {reply.usage.completion_tokens} tokens: {answer[:50]!r}"
    }


def _write_results(work: Path, steps: list[Step]) -> None:
    rows = [
        {
            "step": s.name,
            "command": s.command,
            "wall_s": round(s.run.wall_s, 1),
            "peak_rss_gb": round(s.run.peak_rss / 1e9, 2),
            "peak_anon_gb": round(s.run.peak_anon / 1e9, 2),
            "load_avg": round(s.load_avg, 1),
            "found": s.found,
        }
        for s in steps
    ]
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


def _print_table(steps: list[Step]) -> None:
    print()
    print(
        "| step | wall time | peak RSS | of it anonymous | load avg | found |\n|---|---:|---:|---:|---:|---|"
    )
    for s in steps:
        memory = f"{s.run.peak_rss / 1e9:.2f} GB | {s.run.peak_anon / 1e9:.2f} GB"
        print(f"| {s.name} | {s.run.wall_s:.0f} s | {memory} | {s.load_avg:.1f} | {s.found} |")
    for s in steps:
        print(f"{s.name}: {s.command}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole path, one process per step")
    run.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "phivision-full-size"))
    run.add_argument("--checkpoint", help="an existing full-size stand-in to use instead of writing one")
    run.add_argument(
        "--shared-weights",
        help="a stand-in written with the same seed: after the standin step, each shard file byte-identical to "
        "its twin there becomes a link to it (a full-size stand-in and its export need 16.6 GB of disk)",
    )
    run.add_argument("--num-crops", type=int, default=4)
    run.add_argument(
        "--small", action="store_true", help="a shrunk stand-in (2 layers): try the script quickly"
    )
    run.add_argument("--steps", type=int, default=6, help="LoRA steps (~100 s each on 2 cores)")
    run.add_argument("--train-samples", type=int, default=2, help="the handful of examples to overfit")
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--eval-items", type=int, default=2)
    run.add_argument("--images", type=int, default=2, help="photos for greedy, clean venv, predict")
    run.add_argument("--new-tokens", type=int, default=12)
    run.add_argument("--serve-timeout", type=float, default=900)
    run.add_argument("--export-args", nargs="*", default=[], help="extra `phivision export` flags")
    run.add_argument(
        "--attn", default="sdpa", help="attn_implementation for training: sdpa, flash_attention_2"
    )
    run.add_argument("--train-overrides", nargs="*", default=[], help="extra training config overrides")
    run.add_argument("--device", default="cpu", help="device of the greedy and clean-load children")
    run.add_argument("--clean-python", choices=("venv", "same"), default="venv", help="see clean_python()")
    run.add_argument(
        "--skip",
        type=lambda text: set(text.split(",")),
        default=set(),
        help="steps to skip: clean,predict,serve",
    )
    run.add_argument("--until", help="stop after this step (e.g. train)")
    standin = sub.add_parser("standin", help="write a full-size stand-in")
    standin.add_argument("--out", required=True)
    standin.add_argument("--num-crops", type=int, default=4)
    standin.add_argument("--small", action="store_true")
    greedy = sub.add_parser("greedy", help=argparse.SUPPRESS)
    greedy.add_argument("--model", required=True)
    greedy.add_argument("--new-tokens", type=int, default=12)
    greedy.add_argument("--device", default="cpu")
    greedy.add_argument("--images", nargs="+", required=True)
    clean = sub.add_parser("clean", help=argparse.SUPPRESS)
    clean.add_argument("--model", required=True)
    clean.add_argument("--spec", required=True)
    clean.add_argument("--new-tokens", type=int, default=12)
    clean.add_argument("--device", default="cpu")
    args = parser.parse_args()
    commands = {"run": run_path, "standin": write_standin, "greedy": phivision_greedy, "clean": clean_greedy}
    commands[args.command](args)


if __name__ == "__main__":
    main()
