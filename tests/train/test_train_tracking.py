"""Trackers: W&B offline, TensorBoard event files, MLflow on sqlite, none; a missing package names the extra."""

from __future__ import annotations

import pytest

from phivision.errors import PhivisionError
from phivision.train import tracking, train
from phivision.train.tracking import read_metrics

SHORT = ("schedule.max_steps=2", "eval.every_steps=2")


def test_wandb_offline_writes_a_run_with_the_sample_table(quick_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(quick_config("wandb", "tracking.backend=wandb", *SHORT)).out
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's log, synced later with `wandb sync`
    tables = list(runs[0].rglob("eval/samples_*.table.json"))
    assert tables, "the eval sample table (image, true, predicted) was not logged"
    assert read_metrics(run, "eval")


def test_tensorboard_writes_scalars_images_and_text(quick_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(quick_config("tb", "tracking.backend=tensorboard", *SHORT)).out
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "eval/val_loss", "eval/category_accuracy"} <= set(tags["scalars"])
    assert "eval/sample_0" in tags["images"]
    assert any("eval/samples" in t for t in tags["tensors"])  # the true-vs-predicted markdown table


def test_none_writes_only_metrics_jsonl(quick_config):
    run = train(quick_config("none", *SHORT)).out
    assert not (run / "wandb").exists() and not (run / "tensorboard").exists()
    assert len(read_metrics(run, "train")) == 2


def test_missing_mlflow_names_the_extra(quick_config, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name)
    )
    with pytest.raises(PhivisionError, match=r"pip install phivision\[mlflow\]"):
        train(quick_config("mlflow", "tracking.backend=mlflow", *SHORT))


def test_mlflow_logs_params_metrics_and_the_sample_table(quick_config, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # the [mlflow] extra; scripts/test.sh installs it
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = train(
        quick_config(
            "mlflow",
            "tracking.backend=mlflow",
            f"tracking.mlflow_tracking_uri={uri}",
            *SHORT,
        )
    ).out
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("phivision").experiment_id])
    assert logged.data.params["method"] == "lora"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "train_loss")] == [1, 2]
    assert "eval_val_loss" in logged.data.metrics
    artifacts = [a.path for a in client.list_artifacts(logged.info.run_id, "eval/step-2")]
    assert "eval/step-2/samples.json" in artifacts
    assert logged.info.run_name == run.name
