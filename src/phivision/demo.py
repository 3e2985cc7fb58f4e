"""`phivision demo`: the whole path on an embedded default, on any laptop.

A synthetic catalog (whose look decides category and price) and a tiny random Phi-3-Vision checkpoint go through
the same code as a real run: evaluate the base model, fine-tune it, evaluate again, write the HTML report and
print a before/after table. Outputs land in ``DIR``::

    DIR/data/          the synthetic dataset (catalog.parquet, images/)
    DIR/base/          the tiny checkpoint (official layout)
    DIR/run/           the training run (weights, processor, config.yaml, eval/before, eval/after)
    DIR/report.html    the HTML report
    DIR/metrics.json   {"before": M, "after": M, "baseline": M} on the test split
"""

from __future__ import annotations

import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from phivision.errors import PhivisionError
from phivision.evaluate.metrics import HEADLINE, format_value
from phivision.io import atomic_write_json

DEMO_CONFIG = "demo.yaml"
HEADLINE_KEYS = [key for key, _, _ in HEADLINE]


def demo_config_path() -> Path:
    """The packaged demo recipe (``phivision/configs/demo.yaml``)."""
    return Path(str(resources.files("phivision") / "configs" / DEMO_CONFIG))


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The flat metric keys of the evaluation issue, in their usual order."""
    return {key: metrics[key] for key in HEADLINE_KEYS if key in metrics}


def comparison_table(before: dict, after: dict, baseline: dict) -> str:
    """An aligned before/after/baseline table of the headline metrics."""
    kinds = {key: kind for key, _, kind in HEADLINE}
    labels = {key: label for key, label, _ in HEADLINE}
    rows = [f"{'metric':<28}{'before':>12}{'after':>12}{'baseline':>12}"]
    for key in HEADLINE_KEYS:
        if key not in after:
            continue
        cells = [format_value(m.get(key), kinds[key]) if key in m else "-" for m in (before, after, baseline)]
        rows.append(f"{labels[key]:<28}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(rows)


def run_demo(
    out: str | os.PathLike = "phivision-demo",
    n: int = 600,
    seed: int = 0,
    config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Sample, build a tiny model, evaluate, fine-tune, evaluate, report. Returns the metrics.json content.

    Args:
        out: output directory. A rerun reuses finished steps (dataset, checkpoint) and resumes training.
        n: products in the synthetic catalog.
        seed: seeds the catalog, the tiny weights and training.
        config: a training YAML replacing the packaged demo recipe.
        overrides: ``key=value`` training overrides (e.g. ``schedule.epochs=2``).
        fresh: delete ``out`` first.
        progress: show progress bars.
    """
    from phivision.data.layout import load_catalog
    from phivision.data.sample import write_sample_catalog
    from phivision.evaluate.evaluation import eval_dir, evaluate
    from phivision.evaluate.report import write_report
    from phivision.model.tiny import write_tiny_checkpoint
    from phivision.train.config import load_config
    from phivision.train.loop import train

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    data_dir, base_dir, run_dir = out / "data", out / "base", out / "run"
    started = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    if not (data_dir / "catalog.parquet").exists():
        step(f"sampling a synthetic catalog of {n} products -> {data_dir}")
        write_sample_catalog(data_dir, n=n, seed=seed)
    catalog = load_catalog(data_dir)

    if not (base_dir / "config.json").exists():
        step(f"writing a tiny random Phi-3-Vision checkpoint -> {base_dir}")
        corpus = [*catalog["title"].astype(str), *catalog["category"].astype(str)]
        write_tiny_checkpoint(base_dir, seed=seed, corpus=corpus)

    train_config = load_config(
        config or demo_config_path(),
        overrides,
        model=str(base_dir),
        out=str(run_dir),
        seed=seed,
        data={"path": str(data_dir)},
    )
    eval_batch = train_config.eval.batch_size
    max_new_tokens = train_config.eval.max_new_tokens

    before_dir = eval_dir(run_dir, "before")
    if (before_dir / "metrics.json").exists():
        from phivision.evaluate.report import load_stage

        before = load_stage(before_dir / "predictions.jsonl").metrics
    else:
        step("evaluating the base model on the test split")
        before = evaluate(
            base_dir,
            data_dir,
            "test",
            out=before_dir,
            batch_size=eval_batch,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )

    if not (run_dir / "config.yaml").exists() or not (run_dir / "trainer_state.json").exists():
        step(f"fine-tuning ({train_config.method}) -> {run_dir}")
    else:
        step(f"resuming or reusing the run in {run_dir}")
    result = train(train_config, resume=True, progress=progress)
    loss = "" if result.train_loss is None else f", final train loss {result.train_loss:.4f}"
    step(f"trained {result.steps} steps{loss}")

    step("evaluating the fine-tuned model on the test split")
    after = evaluate(
        run_dir,
        data_dir,
        "test",
        out=eval_dir(run_dir, "after"),
        batch_size=eval_batch,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    baseline = after.get("baseline") or {}
    report = write_report(run=run_dir, out=out / "report.html")

    metrics = {"before": headline(before), "after": headline(after), "baseline": headline(baseline)}
    atomic_write_json(out / "metrics.json", metrics)
    print()
    print(comparison_table(metrics["before"], metrics["after"], metrics["baseline"]))
    print()
    step(f"report: {report}")
    step(f"metrics: {out / 'metrics.json'}")
    if not metrics["after"]:
        raise PhivisionError(f"{out / 'metrics.json'}: the evaluation after fine-tuning produced no metrics")
    return metrics
