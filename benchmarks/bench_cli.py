"""How fast the CLI answers: `phivision --help`, `-h`, `--version` and every `phivision VERB --help`, against
`python -c "import typer, rich"` (the floor for any typer CLI), measured side by side.

Each round runs every command once, in a shuffled order, so a machine whose load drifts (a shared one) affects
them all alike; the table gives each command's median wall time and peak memory and its ratio to the floor's
median. The target of issue 11: at most 3x the floor.

    python benchmarks/bench_cli.py              # 15 rounds
    python benchmarks/bench_cli.py --rounds 30
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time

FLOOR = "python -c 'import typer, rich'"


def commands() -> dict[str, list[str]]:
    script = os.path.join(os.path.dirname(sys.executable), "phivision")
    verbs = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in verbs.split("Commands:")[1].splitlines() if line.startswith("  ")]
    table = {
        FLOOR: [sys.executable, "-c", "import typer, rich"],
        "python -c 'import phivision'": [sys.executable, "-c", "import phivision"],
        "phivision --help": [script, "--help"],
        "phivision -h": [script, "-h"],
        "phivision --version": [script, "--version"],
    }
    table.update({f"phivision {verb} --help": [script, verb, "--help"] for verb in names})
    return table


def run_once(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    table = commands()
    times: dict[str, list[float]] = {name: [] for name in table}
    memory: dict[str, list[float]] = {name: [] for name in table}
    load = os.getloadavg()
    for command in table.values():  # one untimed run each: file caches warm, as for a user's second call
        run_once(command)
    for _ in range(args.rounds):
        order = list(table)
        random.shuffle(order)
        for name in order:
            seconds, mb = run_once(table[name])
            times[name].append(seconds)
            memory[name].append(mb)
    floor = statistics.median(times[FLOOR])
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.1f} at start, {args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print()
    print("| command | median (s) | min (s) | max (s) | x floor (median) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in table:
        values = times[name]
        median = statistics.median(values)
        print(
            f"| `{name}` | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {median / floor:.2f} | "
            f"{statistics.median(memory[name]):.0f} |"
        )


if __name__ == "__main__":
    main()
