"""`phivision demo` on a busy laptop: demo-sized training steps and the whole demo, alone and beside other work.

Issue 11 saw 30 demo-sized training steps take 165 s with torch's default thread count and 26 s with one thread
while two lower-priority torch training jobs ran on the same 2 cores. This script reproduces that setting and
tests what makes the difference:

    steps   30 training steps of the demo recipe (full fine-tuning of the tiny model, batch 16), timed by the
            training loop itself (``elapsed_s`` in metrics.jsonl: model loading and imports excluded), for each
            foreground setting (``--threads``: torch threads, optionally with an OMP_WAIT_POLICY) beside each
            background (``--backgrounds``): nothing, NICE'd torch training jobs (an MLP with ~0.5 GB of
            activations, torch's default threads), NICE'd pure-Python CPU burners. Settings are interleaved
            round by round, so a machine whose load drifts affects them all alike.
    demo    the whole ``phivision demo`` (600 products), wall time, alone and beside the torch jobs.
    ops     the mechanism in isolation: milliseconds per forward+backward of one small layer (640 x 128 @
            128 x 512, the size of the tiny model's matmuls), same settings and backgrounds, 4 s each.

    python benchmarks/bench_demo.py steps --rounds 3
    python benchmarks/bench_demo.py steps --threads 2,1,2:passive,2:active --backgrounds none,torch,burn
    python benchmarks/bench_demo.py demo --backgrounds none,torch
    python benchmarks/bench_demo.py ops --threads 1,2,2:passive,2:active

Background jobs run at ``nice 10`` in their own session (``setsid``), as jobs started from another terminal do,
so the kernel's autogroup scheduling treats them as another session's work.

``--realtime`` runs each measured process under ``chrt -f 10`` (root): it then preempts every ordinary process,
which is the nearest thing to an idle machine on a shared one (use it with ``--backgrounds none``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 30
PYTHON = sys.executable
PREFIX: list[str] = []  # ["chrt", "-f", "10"] with --realtime
PARENT = os.getppid()  # in a background job: the benchmark that started it


# --------------------------------------------------------------------------------------- background work


def torch_job(threads: int) -> None:
    """A torch training loop that never ends: a 4-layer MLP on a batch of 8192 x 2048 (~0.5 GB of activations
    and gradients), the kind of job that shares a laptop with the demo."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = torch.nn.Sequential(
        *[m for _ in range(4) for m in (torch.nn.Linear(2048, 2048), torch.nn.GELU())]
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(8192, 2048)
    while os.getppid() == PARENT:  # ends with the benchmark, however that ends
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def burn_job() -> None:
    """A CPU burner that touches no memory to speak of."""
    n = 0
    while os.getppid() == PARENT:
        for _ in range(100_000):
            n = (n * 1103515245 + 12345) % 2147483648


def start_background(kind: str, nice: int) -> list[subprocess.Popen]:
    """Two jobs of ``kind`` (torch, torch1 = one thread each, burn), each at ``nice`` in its own session."""
    if kind == "none":
        return []
    role = {"torch": "torch:0", "torch1": "torch:1", "burn": "burn"}[kind]
    procs = []
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                [PYTHON, __file__, "_background", role, str(os.getpid())],
                preexec_fn=lambda: os.nice(nice),
                start_new_session=True,
                stdout=subprocess.DEVNULL,
            )
        )
    time.sleep(8)  # let them import torch and reach their loop
    return procs


def stop_background(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait()


# ------------------------------------------------------------------------------------------- the demo run


def prepare_inputs(work: Path) -> tuple[Path, Path]:
    """The demo's dataset (600 products, seed 0) and tiny checkpoint, made once in ``work``."""
    data, base = work / "data", work / "base"
    if not (base / "config.json").exists():
        code = (
            "from phivision.data.sample import write_sample_catalog\n"
            "from phivision.data.layout import load_catalog\n"
            "from phivision.tiny import write_tiny_checkpoint\n"
            f"write_sample_catalog({str(data)!r}, n=600, seed=0)\n"
            f"c = load_catalog({str(data)!r})\n"
            f"write_tiny_checkpoint({str(base)!r}, seed=0, corpus=[*c.title.astype(str), *c.category.astype(str)])\n"
        )
        subprocess.run([PYTHON, "-c", code], check=True)
    return data, base


def parse_setting(setting: str) -> tuple[int, dict[str, str]]:
    """``"2"`` -> (2, {}); ``"2:passive"`` -> (2, {OMP_WAIT_POLICY: PASSIVE}); ``"2:spin1000"`` -> (2,
    {GOMP_SPINCOUNT: 1000}): torch threads and the OpenMP environment of the measured process."""
    threads, _, policy = setting.partition(":")
    if policy.startswith("spin"):
        return int(threads), {"GOMP_SPINCOUNT": policy.removeprefix("spin")}
    return int(threads), {"OMP_WAIT_POLICY": policy.upper()} if policy else {}


def openmp_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **extra}


def time_steps(setting: str, data: Path, base: Path, work: Path, steps: int = STEPS) -> float:
    """Seconds of ``steps`` demo training steps in a fresh process with ``setting``'s threads and wait policy."""
    threads, extra = parse_setting(setting)
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    env = openmp_env(extra)
    command = [
        *PREFIX, PYTHON, "-m", "phivision.cli", "train", "--config", str(demo_config()), "--data", str(data),
        "--model", str(base), "--out", str(out), f"num_threads={threads}", f"schedule.max_steps={steps}",
        "tracking.log_every=10", "eval.max_samples=16", "eval.gen_samples=0",
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    return next(r["elapsed_s"] for r in records if r.get("type") == "train" and r["step"] == steps)


def time_demo(extra: list[str], work: Path) -> float:
    out = work / "demo"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        [*PREFIX, PYTHON, "-m", "phivision.cli", "demo", "--out", str(out), *extra],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def small_ops(threads: int) -> None:
    """Print milliseconds per forward+backward of one small layer, measured for 4 s (runs in a child)."""
    import torch

    torch.set_num_threads(threads)
    x, w = torch.randn(640, 128), torch.randn(128, 512, requires_grad=True)

    def step() -> None:
        torch.nn.functional.gelu(x @ w).sum().backward()

    for _ in range(50):
        step()
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < 4:
        step()
        n += 1
    print(1e3 * (time.perf_counter() - started) / n)


def time_ops(setting: str) -> float:
    threads, extra = parse_setting(setting)
    env = openmp_env(extra)
    done = subprocess.run(
        [*PREFIX, PYTHON, __file__, "_ops", str(threads)], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def demo_config() -> Path:
    from phivision.demo import demo_config_path

    return demo_config_path()


# ------------------------------------------------------------------------------------------------ tables


def machine() -> str:
    import torch

    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}, "
        f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}"
    )


def print_table(title: str, rows: dict[tuple[str, str], list[float]], unit: str) -> None:
    print(f"\n{title}\n")
    print(f"| background | setting | runs ({unit}) | median ({unit}) | vs alone, same setting |")
    print("|---|---|---|---:|---:|")
    for (background, setting), values in rows.items():
        median = statistics.median(values)
        alone = rows.get(("none", setting))
        ratio = f"{median / statistics.median(alone):.2f}x" if alone else "-"
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {background} | {setting} | {runs} | {median:.1f} | {ratio} |")


def run_matrix(backgrounds, settings, rounds, nice, measure) -> dict[tuple[str, str], list[float]]:
    """Every (background, setting) ``rounds`` times; within a round every setting runs beside one background
    start, and the settings' order alternates between rounds."""
    rows: dict[tuple[str, str], list[float]] = {(b, s): [] for b in backgrounds for s in settings}
    for round_index in range(rounds):
        for background in backgrounds:
            procs = start_background(background, nice)
            try:
                order = settings if round_index % 2 == 0 else list(reversed(settings))
                for setting in order:
                    value = measure(setting)
                    rows[(background, setting)].append(value)
                    print(
                        f"  round {round_index + 1}: {background:>6} {setting:>10}: {value:.1f}", flush=True
                    )
            finally:
                stop_background(procs)
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_ops":
        small_ops(int(sys.argv[2]))
        return
    if len(sys.argv) > 3 and sys.argv[1] == "_background":
        role = sys.argv[2]
        if int(sys.argv[3]) != PARENT:
            return
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        torch_job(int(role.split(":")[1])) if role.startswith("torch") else burn_job()
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["steps", "demo", "ops"])
    parser.add_argument(
        "--threads",
        default="2,1",
        help="foreground settings: THREADS[:passive|:active|:spinN (GOMP_SPINCOUNT)],...",
    )
    parser.add_argument("--backgrounds", default="none,torch,burn", help="none, torch, torch1, burn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps timed (steps only)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the background jobs")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "phivision-bench-demo")
    parser.add_argument("--demo-args", default="", help="extra `phivision demo` arguments (demo only)")
    parser.add_argument("--realtime", action="store_true", help="measure under chrt -f 10 (an idle machine)")
    args = parser.parse_args()
    if args.realtime:
        PREFIX.extend(["chrt", "-f", "10"])
    args.work.mkdir(parents=True, exist_ok=True)
    backgrounds = args.backgrounds.split(",")
    print(machine() + (" (measured under chrt -f 10)" if args.realtime else ""))
    if args.what == "ops":
        settings = args.threads.split(",")
        rows = run_matrix(backgrounds, settings, args.rounds, args.nice, time_ops)
        print_table(f"one small layer, forward+backward (ms; background at nice {args.nice})", rows, "ms")
    elif args.what == "steps":
        data, base = prepare_inputs(args.work)
        settings = args.threads.split(",")
        rows = run_matrix(
            backgrounds,
            settings,
            args.rounds,
            args.nice,
            lambda s: time_steps(s, data, base, args.work, args.steps),
        )
        print_table(f"{args.steps} demo training steps (seconds; background at nice {args.nice})", rows, "s")
    else:
        settings = [args.demo_args or "default"]
        extra = args.demo_args.split()
        rows = run_matrix(
            backgrounds, settings, args.rounds, args.nice, lambda s: time_demo(extra, args.work)
        )
        print_table(f"`phivision demo` wall time (seconds; background at nice {args.nice})", rows, "s")


if __name__ == "__main__":
    main()
