"""Evaluation: ``evaluate`` (metrics.json + predictions.jsonl), the metrics and their bootstrap intervals, and the
HTML report. Answers come from :mod:`phivision.answer`."""
