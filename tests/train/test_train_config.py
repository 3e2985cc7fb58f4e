"""The training config: YAML + dotted overrides, strict keys and types, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phivision.demo import demo_config_path
from phivision.errors import PhivisionError
from phivision.train.config import cli_config, load_config, parse_overrides


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("method: full\noptim:\n  lr: 3.0e-5\n  grad_accum: 4\nlora:\n  r: 8\n")
    cfg = load_config(
        path, ["optim.lr=1e-4", "lora.target_modules=qkv_proj,o_proj", "eval.metric=price_mape"]
    )
    assert cfg.method == "full"
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; the float field parses it
    assert cfg.optim.grad_accum == 4
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ["qkv_proj", "o_proj"]
    assert cfg.eval.metric == "price_mape"
    assert cfg.optim.weight_decay == 0.01  # untouched default


def test_parse_overrides_nests_and_reads_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=true", "d=x"]) == {"a": {"b": 1, "c": True}, "d": "x"}
    with pytest.raises(PhivisionError, match="expected key=value"):
        parse_overrides(["optim.lr"])


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("optim:\n  lrr: 1.0e-4\n", [], "unknown config key 'optim.lrr'"),
        ("", ["optim.nope=1"], "unknown config key 'optim.nope'"),
        ("", ["data.batch_size=two"], "config key 'data.batch_size': expected int"),
        ("", ["gradient_checkpointing=3"], "config key 'gradient_checkpointing': expected bool"),
        ("", ["method=dora"], "config key 'method': 'dora' is not one of lora, qlora, full"),
        ("optim: 3\n", [], "config key 'optim': expected a mapping"),
        ("", ["eval.patience=2"], "early stopping needs 'eval.every_steps'"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, text, overrides, message):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(PhivisionError, match=message) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_resume_reads_the_runs_own_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(None, ["method=full", "optim.lr=5e-5"]).to_yaml())
    cfg = cli_config(run, resume=True, overrides=["schedule.max_steps=9"])
    assert (cfg.method, cfg.optim.lr, cfg.schedule.max_steps, cfg.out) == ("full", 5e-5, 9, str(run))


def test_cli_rejects_an_unknown_key_with_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "phivision.cli",
            "train",
            "--out",
            str(tmp_path / "r"),
            "--data",
            "d",
            "--model",
            "m",
            "optim.lrr=1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown config key 'optim.lrr'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


SHIPPED = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "path",
    [SHIPPED / "lora.yaml", SHIPPED / "qlora.yaml", SHIPPED / "full.yaml", demo_config_path()],
    ids=str,
)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.method in ("lora", "qlora", "full")
    header = path.read_text().splitlines()[0]
    assert header.startswith("#")  # every config opens with what it is for and how to launch it


def test_shipped_accelerate_configs_name_an_engine():
    import yaml

    root = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    engines = {p.name: yaml.safe_load(p.read_text())["distributed_type"] for p in root.glob("*.yaml")}
    assert engines == {
        "ddp.yaml": "MULTI_GPU",
        "multi_node_ddp.yaml": "MULTI_GPU",
        "deepspeed_zero2.yaml": "DEEPSPEED",
        "deepspeed_zero3.yaml": "DEEPSPEED",
        "fsdp.yaml": "FSDP",
    }
