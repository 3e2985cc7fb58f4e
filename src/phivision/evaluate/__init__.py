"""Evaluation: batched generation, metrics, ``evaluate`` (metrics.json + predictions.jsonl) and the HTML report."""

from phivision.evaluate.evaluation import eval_dir, evaluate

__all__ = ["eval_dir", "evaluate"]
