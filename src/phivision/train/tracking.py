"""Experiment tracking: W&B, TensorBoard, MLflow or none. ``RUN/metrics.jsonl`` is always written.

Only the main process creates a tracker. At each evaluation the trackers also get a few sample images with the
true and the predicted answer (a W&B table; images and markdown text in TensorBoard; an MLflow table artifact).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError
from phivision.io import atomic_write_text
from phivision.train.config import TrainConfig


class MetricsFile:
    """Append-only JSON lines, flushed per record so a killed run keeps everything logged before the kill."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (by a run killed after its last checkpoint) before resuming."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in kept if json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``, optionally only those of one ``type`` ("train" or "eval")."""
    path = RunLayout(run_dir).metrics_log
    if not path.exists():
        raise PhivisionError(f"{path}: no metrics logged (is {run_dir} a training run?)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("type") == kind]


class Tracker:
    """No-op tracker (backend 'none'): metrics go only to ``RUN/metrics.jsonl``."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_samples(self, rows: list[tuple[Image.Image, str, str]], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, config: TrainConfig, run_dir: Path, resume_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=config.tracking.project,
            name=config.tracking.run_name or run_dir.name,
            dir=str(run_dir),
            config=config.to_dict(),
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[tuple[Image.Image, str, str]], step: int) -> None:
        table = self.wandb.Table(columns=["image", "true", "predicted"])
        for image, true, predicted in rows:
            table.add_data(self.wandb.Image(image), true, predicted)
        self.run.log({"eval/samples": table}, step=step)

    def finish(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_samples(self, rows: list[tuple[Image.Image, str, str]], step: int) -> None:
        lines = ["| # | true | predicted |", "|---|---|---|"]
        for i, (image, true, predicted) in enumerate(rows):
            self.writer.add_image(
                f"eval/sample_{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC"
            )
            lines.append(f"| {i} | {true} | {predicted} |")
        self.writer.add_text("eval/samples", "\n".join(lines), step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    def __init__(self, config: TrainConfig, run_dir: Path, resume_id: str | None):
        import mlflow

        self.mlflow = mlflow
        if config.tracking.mlflow_tracking_uri:
            mlflow.set_tracking_uri(config.tracking.mlflow_tracking_uri)
        mlflow.set_experiment(config.tracking.project)
        self.run = mlflow.start_run(run_id=resume_id, run_name=config.tracking.run_name or run_dir.name)
        self.run_id = self.run.info.run_id
        if not resume_id:
            flat = _flatten(config.to_dict())
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()}, step=step)

    def log_samples(self, rows: list[tuple[Image.Image, str, str]], step: int) -> None:
        for i, (image, _, _) in enumerate(rows):
            self.mlflow.log_image(image, f"eval/step-{step}/sample_{i}.png")
        table = {"true": [r[1] for r in rows], "predicted": [r[2] for r in rows]}
        self.mlflow.log_table(table, artifact_file=f"eval/step-{step}/samples.json")

    def finish(self) -> None:
        self.mlflow.end_run()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def require_backend(backend: str) -> None:
    """Fail before any training work when the tracker's optional package is missing."""
    if backend != "none" and importlib.util.find_spec(backend) is None:
        raise PhivisionError(
            f"tracking.backend={backend} needs the '{backend}' package: pip install phivision[{backend}]"
        )


def make_tracker(config: TrainConfig, run_dir: Path, resume_id: str | None = None) -> Tracker:
    """The tracker for ``config.tracking.backend``; a missing optional package is a one-line error."""
    backend = config.tracking.backend
    require_backend(backend)
    if backend == "none":
        return Tracker()
    if backend == "wandb":
        return WandbTracker(config, run_dir, resume_id)
    if backend == "tensorboard":
        return TensorBoardTracker(run_dir)
    return MlflowTracker(config, run_dir, resume_id)
