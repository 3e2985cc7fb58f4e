"""Constrained vs free answers, side by side in one run: parse rate, accuracy and generation speed.

Needs a finished ``phivision demo`` directory (dataset, untrained tiny base, fine-tuned run):

    phivision demo --out phivision-demo
    python benchmarks/bench_constrain.py --demo phivision-demo

Prints three markdown tables:

1. The untrained base (``DEMO/base``, random weights) on the test split: parse rate and the other headline metrics
   with constraints off and on. The base records no label space, so ``evaluate`` constrains the format only
   ("format"); the row "categories" passes the demo catalog's train categories explicitly.
2. The fine-tuned run (``DEMO/run``) on the test split, constraints off and on (its recorded categories).
3. Generation speed of the fine-tuned run on the test images: ``generate_answers`` with and without the
   constraint, alternating (off, on, off, on, ...) ``--repeats`` times each after one untimed warm-up of each, so
   both see the same machine load; images/s and generated tokens/s are totals over the timed repeats, and the
   cost is the relative increase in time per generated token and per image, over all repeats and between the
   median repeats. On a shared machine those swing with the load, so the time spent inside the constraint's
   logits processor is also summed: its share of the free runs' time is the constraint's own cost.

All evaluations use ``phivision.evaluate.evaluation.evaluate`` (the ``phivision evaluate`` code path) with the same
``--max-new-tokens`` and ``--batch-size``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from phivision.answer.constrain import AnswerConstraint, ConstrainedLogits, answer_guide
from phivision.answer.generate import generate_answers
from phivision.api import evaluate
from phivision.data.images import load_image
from phivision.data.layout import load_catalog
from phivision.evaluate.metrics import format_value
from phivision.runs import load_model

METRICS = (
    ("parse_rate", "parse rate", "pct"),
    ("category_accuracy", "category accuracy", "pct"),
    ("price_mape", "price MAPE", "pct"),
    ("price_within_10pct", "price within 10%", "pct"),
    ("title_similarity", "title similarity", "num"),
)


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| constraint | " + " | ".join(label for _, label, _ in METRICS) + " |"]
    lines.append("|---|" + "---:|" * len(METRICS))
    for name, metrics in rows:
        cells = [format_value(metrics.get(key), kind) for key, _, kind in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_evaluations(loaded, data: Path, args, categories: tuple[str, ...] | None) -> list[tuple[str, dict]]:
    """Free, then constrained as ``evaluate`` does it, then (if given) constrained to ``categories``."""
    common = dict(
        split="test", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False
    )
    rows = [("off", evaluate(loaded, data, constrain=False, **common))]
    on = evaluate(loaded, data, constrain=True, **common)
    rows.append((on["constraint"], on))
    if categories is not None:
        loaded.categories = categories
        rows.append(("categories", evaluate(loaded, data, constrain=True, **common)))
        loaded.categories = None
    return rows


class TokenCounter:
    """Wraps ``model.generate`` to count the tokens each call generates (stop token included, padding not)."""

    def __init__(self, model, stop_ids: list[int], pad_id: int) -> None:
        self.model, self.generate, self.stop_ids, self.pad_id = model, model.generate, set(stop_ids), pad_id
        self.tokens = 0
        model.generate = self

    def __call__(self, **kwargs):
        output = self.generate(**kwargs)
        new = output[:, kwargs["input_ids"].shape[1] :].tolist()
        for row in new:
            for token in row:
                self.tokens += 1
                if token in self.stop_ids:
                    break
        return output


class ProcessorClock:
    """Adds up the time spent inside the constraint's logits processor (its own cost, whatever the load)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.call = ConstrainedLogits.__call__
        clock = self

        def timed(processor, input_ids, scores):
            started = time.perf_counter()
            try:
                return clock.call(processor, input_ids, scores)
            finally:
                clock.seconds += time.perf_counter() - started

        ConstrainedLogits.__call__ = timed


def speed(loaded, images, args) -> tuple[str, dict]:
    constraint = AnswerConstraint.for_model(loaded)
    counter = TokenCounter(loaded.model, loaded.processor.stop_token_ids, loaded.processor.pad_token_id)
    clock = ProcessorClock()
    guide = answer_guide(
        loaded.processor.tokenizer,
        constraint,
        loaded.model.config.vocab_size,
        loaded.processor.stop_token_ids[0],
    )

    def once(with_constraint: bool) -> tuple[float, int]:
        counter.tokens = 0
        started = time.perf_counter()
        generate_answers(
            loaded.model,
            loaded.processor,
            images,
            loaded.prompt,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=False,
            constraint=constraint if with_constraint else None,
        )
        return time.perf_counter() - started, counter.tokens

    once(False), once(True)  # warm-up: caches, the compiled guide, allocator
    clock.seconds = 0.0
    runs: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for with_constraint in (False, True):
            runs[with_constraint].append(once(with_constraint))
    lines = ["| constraint | repeats | images/s | generated tokens/s | ms per token | tokens per image |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for with_constraint, label in ((False, "off"), (True, "categories")):
        seconds = sum(t for t, _ in runs[with_constraint])
        tokens = sum(n for _, n in runs[with_constraint])
        n_images = len(images) * args.repeats
        summary[with_constraint] = (seconds / n_images, seconds / tokens, tokens / n_images)
        lines.append(
            f"| {label} | {args.repeats} | {n_images / seconds:.2f} | {tokens / seconds:.1f} | "
            f"{1000 * seconds / tokens:.2f} | {tokens / n_images:.1f} |"
        )
    per_image = summary[True][0] / summary[False][0] - 1
    per_token = summary[True][1] / summary[False][1] - 1
    medians = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    median_cost = medians[True] / medians[False] - 1
    inside = clock.seconds / sum(t for t, _ in runs[False])
    text = "\n".join(lines)
    text += (
        f"\n\nCost of the constraint: {100 * per_token:+.1f}% time per generated token, "
        f"{100 * per_image:+.1f}% time per image over all repeats, {100 * median_cost:+.1f}% between the median "
        f"repeats (off {medians[False]:.2f} s, on {medians[True]:.2f} s). Time inside the logits processor: "
        f"{100 * inside:.1f}% of the free runs' time (guide compiled once; min_new_tokens {guide.min_new_tokens})."
    )
    return text, {"per_token": per_token, "per_image": per_image, "median": median_cost, "inside": inside}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo", type=Path, default=Path("phivision-demo"), help="a finished `phivision demo` dir"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations of each kind (alternating)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="max_new_tokens=")
    data, base, run = args.demo / "data", args.demo / "base", args.demo / "run"
    for path in (data / "catalog.parquet", base / "config.json", run / "config.yaml"):
        if not path.exists():
            raise SystemExit(f"error: {path} is missing: run `phivision demo --out {args.demo}` first")
    catalog = load_catalog(data)
    train_categories = tuple(sorted(set(catalog.loc[catalog["split"] == "train", "category"])))
    test = catalog[catalog["split"] == "test"]

    import llguidance

    print(
        f"torch {torch.__version__}, llguidance {llguidance.__version__}"
        f", {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; {len(test)} test images, batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}\n"
    )
    started = time.perf_counter()
    base_model = load_model(base, device="cpu")
    print("### Untrained tiny base (random weights), test split\n")
    print(metrics_table(run_evaluations(base_model, data, args, train_categories)) + "\n")
    del base_model

    tuned = load_model(run, device="cpu")
    print(f"### Fine-tuned demo run ({len(tuned.categories or ())} recorded categories), test split\n")
    print(metrics_table(run_evaluations(tuned, data, args, None)) + "\n")

    images = [load_image(data / p) for p in test["image_path"]]
    print("### Generation speed of the fine-tuned run (alternating off/on)\n")
    print(speed(tuned, images, args)[0])
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
