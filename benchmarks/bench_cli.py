"""How fast the CLI answers: `phivision --help`, `-h`, `--version` and every `phivision VERB --help`, against
`python -c "import typer, rich"` (the floor for any typer CLI), measured side by side.

Each round runs every command once, in a shuffled order, so a machine whose load drifts (a shared one) affects
them all alike; the table gives each command's median wall time and peak memory and its ratio to the floor's
median. The target of issue 11: at most 3x the floor.

    python benchmarks/bench_cli.py              # 15 rounds
    python benchmarks/bench_cli.py --rounds 30
    python benchmarks/bench_cli.py --before ../main   # also every command of another checkout, interleaved

``--declarations`` adds the measurement behind issue 17's choice of stdlib dataclasses for the option groups: typer
and rich plus 15 groups of 7 range-checked options declared as dataclasses (as ``phivision.args`` does) and as
pydantic v2 models (``defer_build``: no schema is built until a model validates), and plain ``import pydantic``.

``--before TREE`` runs each phivision command a second time with ``PYTHONPATH=TREE/src`` (the same interpreter
and packages, that tree's phivision), so a change and the code it replaces are timed side by side in one run.
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
GROUPS = (
    "import typer, rich\n{imports}\n"
    "for g in range(15):\n"
    "    fields = {{f'f{{i}}': {field} for i in range(7)}}\n"
    "    {define}\n"
)
DECLARATIONS = {
    "typer, rich + 15 option groups as dataclasses": GROUPS.format(
        imports="import dataclasses",
        field="dataclasses.field(default=1, metadata={'help': 'text', 'check': '>= 0'})",
        define="dataclasses.dataclass(type(f'G{g}', (), {'__annotations__': dict.fromkeys(fields, int), **fields}))",
    ),
    "typer, rich + 15 option groups as pydantic models": GROUPS.format(
        imports="from pydantic import BaseModel, ConfigDict, Field",
        field="Field(1, ge=0, description='text')",
        define="type(f'G{g}', (BaseModel,), {'__annotations__': dict.fromkeys(fields, int), **fields, "
        "'model_config': ConfigDict(defer_build=True)})",
    ),
    "python -c 'import pydantic'": "import pydantic",
}


def commands(
    before: str | None = None, declarations: bool = False
) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    script = os.path.join(os.path.dirname(sys.executable), "phivision")
    verbs = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in verbs.split("Commands:")[1].splitlines() if line.startswith("  ")]
    mine = {
        "python -c 'import phivision'": [sys.executable, "-c", "import phivision"],
        "phivision --help": [script, "--help"],
        "phivision -h": [script, "-h"],
        "phivision --version": [script, "--version"],
    }
    mine.update({f"phivision {verb} --help": [script, verb, "--help"] for verb in names})
    table: dict[str, tuple[list[str], dict[str, str] | None]] = {
        FLOOR: ([sys.executable, "-c", "import typer, rich"], None)
    }
    for name, command in mine.items():
        table[name] = (command, None)
        if before is not None:
            env = {**os.environ, "PYTHONPATH": os.path.join(os.path.abspath(before), "src")}
            table[f"{name} (before)"] = (command, env)
    if declarations:
        table.update({name: ([sys.executable, "-c", code], None) for name, code in DECLARATIONS.items()})
    return table


def run_once(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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
    parser.add_argument("--before", help="another checkout whose phivision to time beside this one")
    parser.add_argument(
        "--declarations", action="store_true", help="time dataclass vs pydantic option groups"
    )
    args = parser.parse_args()
    table = commands(args.before, args.declarations)
    times: dict[str, list[float]] = {name: [] for name in table}
    memory: dict[str, list[float]] = {name: [] for name in table}
    load = os.getloadavg()
    for command, env in table.values():  # one untimed run each: file caches warm, as for a user's second call
        run_once(command, env)
    for _ in range(args.rounds):
        order = list(table)
        random.shuffle(order)
        for name in order:
            seconds, mb = run_once(*table[name])
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
