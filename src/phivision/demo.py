"""`phivision demo`: the whole path on an embedded default, on any laptop.

A synthetic catalog (whose look decides category and price) and a tiny random Phi-3-Vision checkpoint go through
the same code as a real run: evaluate the base model, fine-tune it, evaluate again, write the HTML report and
print a before/after table. Outputs land in ``DIR``::

    DIR/data/          the synthetic dataset (catalog.parquet, images/)
    DIR/base/          the tiny checkpoint (official layout)
    DIR/run/           the training run (weights, processor, config.yaml, eval/before, eval/after)
    DIR/report.html    the HTML report
    DIR/metrics.json   {"before": M, "after": M, "baseline": M} on the test split
    DIR/demo.json      the inputs each finished step was computed from

A rerun reuses a finished step only when its recorded inputs (n, seed, the resolved training config with its
overrides, the phivision version, and the steps it was computed from) equal today's; any other step is computed
again, and so is everything downstream of it. An interrupted training run with the same inputs is resumed.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from phivision.args import DemoArgs, EvaluateArgs, Generation, ReportArgs
from phivision.data.layout import RunLayout, load_catalog
from phivision.data.sample import write_sample_catalog
from phivision.errors import PhivisionError
from phivision.evaluate.evaluation import evaluate
from phivision.evaluate.metrics import HEADLINE, format_value
from phivision.evaluate.report import write_report
from phivision.io import atomic_write_json
from phivision.threads import quiet_openmp_waits
from phivision.tiny import write_tiny_checkpoint
from phivision.train.config import load_config
from phivision.train.loop import train
from phivision.version import __version__

DEMO_CONFIG = "demo.yaml"
STATE_FILE = "demo.json"
REPORT, METRICS = "report.html", "metrics.json"
DEMO_ENTRIES = {"data", "base", "run", REPORT, METRICS, STATE_FILE}


def demo_config_path() -> Path:
    """The packaged demo recipe (``phivision/configs/demo.yaml``)."""
    return Path(str(resources.files("phivision") / "configs" / DEMO_CONFIG))


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The flat metric keys of the evaluation issue, in their usual order."""
    return {key: metrics[key] for key, _, _ in HEADLINE if key in metrics}


def comparison_table(before: dict, after: dict, baseline: dict) -> str:
    """An aligned before/after/baseline table of the headline metrics."""
    rows = [f"{'metric':<28}{'before':>12}{'after':>12}{'baseline':>12}"]
    for key, label, kind in HEADLINE:
        if key not in after:
            continue
        cells = [format_value(m.get(key), kind) if key in m else "-" for m in (before, after, baseline)]
        rows.append(f"{label:<28}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ step record


@dataclass
class Step:
    """One demo step: what it writes (removed before it is computed again), the file that shows it finished, and
    what its result depends on (upstream steps enter by their ``id``)."""

    name: str
    paths: list[Path]
    marker: Path
    inputs: dict[str, Any]

    def __post_init__(self) -> None:
        self.inputs = json.loads(json.dumps(self.inputs, default=str))  # as it will read back from demo.json


class StepRecord:
    """``OUT/demo.json``: per step, the inputs it was computed from, whether it finished, and a fresh ``id``
    each time it is computed (downstream steps list the ids they used, so they follow any recomputation)."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE_FILE
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.steps: dict[str, dict] = data["steps"] if isinstance(data.get("steps"), dict) else {}
        except (FileNotFoundError, ValueError, AttributeError, KeyError):
            self.steps = {}  # nothing recorded (or unreadable): every step is computed again

    def state(self, step: Step) -> str:
        """``done`` (same inputs, finished, outputs there), ``started`` (same inputs, unfinished) or ``stale``."""
        entry = self.steps.get(step.name) or {}
        if entry.get("inputs") != step.inputs or not step.marker.exists():
            return "stale"
        return "done" if entry.get("done") else "started"

    def changes(self, step: Step) -> str:
        """What differs from the recorded inputs, in words (for the log line)."""
        old = (self.steps.get(step.name) or {}).get("inputs")
        if old is None:
            return "not computed before"
        if old == step.inputs:
            return "its output is missing or unfinished"
        diffs = _diff(old, step.inputs)
        return "changed: " + ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")

    def start(self, step: Step) -> None:
        self.steps[step.name] = {"inputs": step.inputs, "done": False}
        self._save()

    def finish(self, step: Step) -> None:
        self.steps[step.name].update(done=True, id=uuid.uuid4().hex[:12])
        self._save()

    def id(self, name: str) -> str:
        return self.steps.get(name, {}).get("id", "")

    def _save(self) -> None:
        atomic_write_json(self.path, {"steps": self.steps})


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []
    name = prefix.rstrip(".")
    if name.startswith("upstream."):
        return [f"{name.removeprefix('upstream.')} was recomputed"]
    return [f"{name} {json.dumps(old)} -> {json.dumps(new)}"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_out_dir(out: Path, fresh: bool) -> None:
    """Refuse an ``--out`` holding anything a demo does not write (it deletes and rewrites what it owns)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PhivisionError(f"--out {out}: exists and is not a directory")
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES and not p.name.startswith(".")
    )
    if foreign:
        raise PhivisionError(
            f"--out {out}: not a phivision demo directory (it holds {', '.join(map(repr, foreign[:3]))}); "
            "pick a new or empty directory"
        )
    if fresh:
        for entry in out.iterdir():
            _remove(entry)


# ----------------------------------------------------------------------------------------------- threads


def choose_threads(num_threads: int, wait_setting: str | None) -> tuple[int, str]:
    """The demo's torch CPU threads and why: the config's ``num_threads``; else torch's default when a wait setting
    is in force; else one thread (torch was loaded earlier with spinning threads: one thread never waits)."""
    if num_threads:
        torch.set_num_threads(num_threads)
        return num_threads, "num_threads"
    if wait_setting:
        return torch.get_num_threads(), f"torch's default; waiting OpenMP threads: {wait_setting}"
    torch.set_num_threads(1)
    return (
        1,
        "torch was loaded before the demo with spin-waiting OpenMP threads; set num_threads=N to override",
    )


# -------------------------------------------------------------------------------------------------- demo


def run_demo(args: DemoArgs) -> dict[str, dict]:
    """Sample, build a tiny model, evaluate, fine-tune, evaluate, report. Returns the metrics.json content.

    ``args`` (:class:`DemoArgs`, validated): ``out`` the output directory (a rerun reuses each finished step
    whose inputs are unchanged, see the module doc); ``n`` products in the synthetic catalog; ``seed`` seeds
    the catalog, the tiny weights and training; ``config`` a training YAML replacing the packaged demo recipe;
    ``overrides`` ``key=value`` training overrides (e.g. ``schedule.epochs=2``); ``fresh`` deletes what an
    earlier demo wrote in ``out`` first; ``progress`` shows progress bars.
    """
    out, n, seed, config, overrides = args.out, args.n, args.seed, args.config, list(args.overrides or [])
    wait_setting = quiet_openmp_waits()  # set by phivision.api.demo before torch loaded; this reads it
    check_out_dir(out, args.fresh)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    data_dir, base_dir, run_dir = out / "data", out / "base", out / "run"
    train_config = load_config(
        config or demo_config_path(),
        overrides,
        model=str(base_dir),
        out=str(run_dir),
        seed=seed,
        data={"path": str(data_dir)},
    )
    threads, reason = choose_threads(train_config.num_threads, wait_setting)
    log(f"torch CPU threads: {threads} ({reason})")
    out.mkdir(parents=True, exist_ok=True)
    record = StepRecord(out)
    version = __version__
    steps = DemoSteps(out, record, log, args.progress)

    steps.run(
        Step("data", [data_dir], data_dir / "catalog.parquet", {"n": n, "seed": seed, "phivision": version}),
        f"sampling a synthetic catalog of {n} products -> {data_dir}",
        lambda: steps.sample(data_dir, n, seed),
    )
    steps.run(
        Step(
            "base",
            [base_dir],
            base_dir / "config.json",
            {"seed": seed, "phivision": version, "upstream": {"data": record.id("data")}},
        ),
        f"writing a tiny random Phi-3-Vision checkpoint -> {base_dir}",
        lambda: steps.tiny(base_dir, data_dir, seed),
    )
    upstream = {"data": record.id("data"), "base": record.id("base")}
    evaluation = {
        "batch_size": train_config.eval.batch_size,
        "max_new_tokens": train_config.eval.max_new_tokens,
    }  # as recorded in demo.json (a changed value recomputes the evaluations)
    resolved = train_config.to_dict()
    for key in (
        "model",
        "out",
    ):  # decided by --out, not inputs: a rerun from another directory is the same run
        resolved.pop(key)
    resolved["data"].pop("path")
    # The run directory also holds eval/before, so an outdated run goes now, before the base model is evaluated.
    training = Step(
        "train",
        [],
        RunLayout(run_dir).trainer_state,
        {"config": resolved, "phivision": version, "upstream": upstream},
    )
    if record.state(training) == "stale":
        _remove(run_dir)

    before_dir, after_dir = RunLayout(run_dir).eval_dir("before"), RunLayout(run_dir).eval_dir("after")
    before = steps.run(
        Step(
            "before",
            [before_dir],
            before_dir / RunLayout.EVAL_METRICS,
            {"eval": evaluation, "phivision": version, "upstream": upstream},
        ),
        "evaluating the base model on the test split",
        lambda: steps.evaluate(base_dir, data_dir, before_dir, evaluation),
        lambda: steps.read_metrics(before_dir),
    )
    steps.run(
        training, f"fine-tuning ({train_config.method}) -> {run_dir}", lambda: steps.train(train_config)
    )
    after = steps.run(
        Step(
            "after",
            [after_dir],
            after_dir / RunLayout.EVAL_METRICS,
            {"eval": evaluation, "phivision": version, "upstream": {**upstream, "train": record.id("train")}},
        ),
        "evaluating the fine-tuned model on the test split",
        lambda: steps.evaluate(run_dir, data_dir, after_dir, evaluation),
        lambda: steps.read_metrics(after_dir),
    )
    return steps.finish(before, after)


class DemoSteps:
    """The demo's steps, each a short call into the library, run or reused through the :class:`StepRecord`."""

    def __init__(self, out: Path, record: StepRecord, log: Callable[[str], None], progress: bool) -> None:
        self.out, self.record, self.log, self.progress = out, record, log, progress

    def run(
        self,
        step: Step,
        message: str,
        compute: Callable[[], Any],
        reuse: Callable[[], Any] | None = None,
    ) -> Any:
        """Reuse ``step`` when it finished with today's inputs; else remove its outputs and compute it (an
        unfinished training run with the same inputs is resumed instead)."""
        state = self.record.state(step)
        if state == "done":
            self.log(f"reusing {step.name}: same inputs as when it was computed")
            return reuse() if reuse else None
        if state == "started" and step.name == "train":
            self.log(f"resuming the unfinished training run (same inputs) in {step.marker.parent}")
        else:
            self.log(f"{message} ({step.name}: {self.record.changes(step)})")
            for path in step.paths:
                _remove(path)
        self.record.start(step)
        result = compute()
        self.record.finish(step)
        return result

    def sample(self, data_dir: Path, n: int, seed: int) -> None:
        write_sample_catalog(data_dir, n=n, seed=seed)

    def tiny(self, base_dir: Path, data_dir: Path, seed: int) -> None:
        catalog = load_catalog(data_dir)
        corpus = [*catalog["title"].astype(str), *catalog["category"].astype(str)]
        write_tiny_checkpoint(base_dir, seed=seed, corpus=corpus)

    def evaluate(self, model: Path, data_dir: Path, out: Path, evaluation: dict) -> dict:
        generation = Generation(**evaluation)
        args = EvaluateArgs(model, data_dir, out, split="test", generation=generation, progress=self.progress)
        return evaluate(args.validate())

    def read_metrics(self, stage_dir: Path) -> dict:
        return json.loads((stage_dir / RunLayout.EVAL_METRICS).read_text(encoding="utf-8"))

    def train(self, config: Any) -> None:
        result = train(config, resume=True, progress=self.progress)
        loss = "" if result.train_loss is None else f", final train loss {result.train_loss:.4f}"
        self.log(f"trained {result.steps} steps{loss}")

    def finish(self, before: dict, after: dict) -> dict[str, dict]:
        """The report, OUT/metrics.json and the before/after table (always rewritten: they are cheap)."""
        report = write_report(ReportArgs(run=self.out / "run", out=self.out / REPORT).validate())
        baseline = after.get("baseline") or {}
        metrics = {"before": headline(before), "after": headline(after), "baseline": headline(baseline)}
        atomic_write_json(self.out / METRICS, metrics)
        print()
        print(comparison_table(metrics["before"], metrics["after"], metrics["baseline"]))
        print()
        self.log(f"report: {report}")
        self.log(f"metrics: {self.out / METRICS}")
        if not metrics["after"]:
            raise PhivisionError(
                f"{self.out / METRICS}: the evaluation after fine-tuning produced no metrics"
            )
        return metrics
