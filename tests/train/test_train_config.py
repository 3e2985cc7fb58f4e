"""The training config: YAML + dotted overrides, strict keys and types, one-line errors."""

from __future__ import annotations

import shlex
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
    # text keys keep the text as typed, where YAML would read a number, a bool or a mapping
    assert parse_overrides(["model=0001", "tracking.run_name=yes", "prompt.question={x}"]) == {
        "model": "0001",
        "tracking": {"run_name": "yes"},
        "prompt": {"question": "{x}"},
    }
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


# ----------------------------------------------------------------------------- values checked up front

BAD_VALUES = [
    ("eval.metric=val_los", "config key 'eval.metric': 'val_los' is not a metric"),
    ("eval.metric=price_mape eval.gen_samples=0", "config key 'eval.metric': 'price_mape' is a generation metric"),
    ("optim.lr=nan", "config key 'optim.lr': must be a finite number, got nan"),
    ("optim.lr=.inf", "config key 'optim.lr': must be a finite number, got inf"),
    ("optim.lr=0", "config key 'optim.lr': must be > 0, got 0.0"),
    ("optim.betas=[2,3]", r"config key 'optim.betas\[0\]': must be in \[0, 1\), got 2.0"),
    ("optim.betas=[0.9,1.0]", r"config key 'optim.betas\[1\]': must be in \[0, 1\), got 1.0"),
    ("optim.betas=[0.9]", "config key 'optim.betas': needs two values"),
    ("optim.eps=-1", "config key 'optim.eps': must be > 0, got -1.0"),
    ("optim.weight_decay=-0.1", "config key 'optim.weight_decay': must be >= 0"),
    ("optim.grad_clip=-1", "config key 'optim.grad_clip': must be >= 0"),
    ("lora.dropout=5", r"config key 'lora.dropout': must be in \[0, 1\), got 5.0"),
    ("lora.dropout=1", r"config key 'lora.dropout': must be in \[0, 1\)"),
    ("lora.alpha=0", "config key 'lora.alpha': must be >= 1"),
    ("lora.target_modules=[] method=lora", "config key 'lora.target_modules': empty"),
    ("data.num_workers=-1", "config key 'data.num_workers': must be >= 0, got -1"),
    ("data.max_train_samples=-5", "config key 'data.max_train_samples': must be >= 0"),
    ("eval.gen_samples=-1", "config key 'eval.gen_samples': must be >= 0, got -1"),
    ("eval.max_new_tokens=0", "config key 'eval.max_new_tokens': must be >= 1"),
    ("tracking.sample_images=-1", "config key 'tracking.sample_images': must be >= 0"),
    ("schedule.warmup_ratio=1.5", r"config key 'schedule.warmup_ratio': must be in \[0, 1\)"),
    ("schedule.min_lr_ratio=2", r"config key 'schedule.min_lr_ratio': must be in \[0, 1\]"),
    ("schedule.epochs=-1", "config key 'schedule.epochs': must be >= 0"),
    ("seed=-1", "config key 'seed': must be in"),
    ("num_crops=-1", "config key 'num_crops': must be >= 0"),
    ("num_threads=-2", "config key 'num_threads': must be >= 0"),
    ("schedule.decay=cosin", "config key 'schedule.decay': 'cosin' is not one of cosine, linear, constant"),
    ("prompt.answer_template='Product: {title}, Full Price: {full_price}'",
     r"config key 'prompt.answer_template': must contain \{category\} exactly once"),
    ("prompt.answer_template='{title} {category} {price}'",
     r"config key 'prompt.answer_template': unknown field \{price\}"),
    ("prompt.answer_template='{title} {category} {full_price:.2f}'",
     r"config key 'prompt.answer_template': field \{full_price\} must be plain"),
    ("prompt.answer_template='{title} {category} {full_price'",
     "config key 'prompt.answer_template': not a format string"),
    ("prompt.answer_template='{title} ({title}) {category} {full_price}'",
     r"must contain \{title\} exactly once \(found 2\)"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(PhivisionError, match=message) as info:
        load_config(None, shlex.split(overrides))
    assert "\n" not in str(info.value)
    assert "np.float" not in str(info.value)


def test_good_values_at_the_edges_pass():
    cfg = load_config(
        None,
        [
            "optim.betas=[0,0.999]",
            "lora.dropout=0",
            "eval.gen_samples=0",
            "eval.metric=val_loss",
            "schedule.min_lr_ratio=1",
            "eval.metric=category_accuracy",
            "eval.gen_samples=4",
            "prompt.answer_template=Category {category} | {title} | price {full_price} {{USD}}",
        ],
    )
    assert cfg.optim.betas == [0.0, 0.999]
    assert cfg.eval.metric == "category_accuracy"


def test_metric_names_come_from_what_evaluation_produces():
    from phivision.train.config import generation_metric_names

    names = generation_metric_names(["category1_code"])
    assert {"parse_rate", "price_mape", "category_accuracy", "title_similarity", "category1_accuracy"} <= set(
        names
    )
    assert "n" not in names and "per_category" not in names
    load_config(None, ["eval.metric=category2_accuracy"])  # a level metric passes until the catalog is known


def test_a_level_metric_the_catalog_lacks_stops_before_the_model_loads(quick_config, tmp_path):
    from phivision.train import train

    cfg = quick_config("levels", "eval.metric=category7_accuracy")
    cfg.model = str(tmp_path / "no-such-model")  # proves nothing was loaded: this path does not exist
    with pytest.raises(PhivisionError, match="'category7_accuracy' is not a metric .* for this catalog"):
        train(cfg)
    assert not (tmp_path / "levels").exists()


def test_cli_stops_on_a_misspelt_metric_before_loading_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "phivision.cli", "train", "--out", str(tmp_path / "r"), "--data", "d",
         "--model", "m", "eval.metric=val_los"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]
    ] and proc.stderr.startswith("error: config key 'eval.metric': 'val_los' is not a metric")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ YAML locations


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("method: full\noptim:\n  lr: [1,\n", [], r"train\.yaml:4: not valid YAML"),
        ("method: full\noptim:\n  lr: .nan\n", [], r"train\.yaml:3: config key 'optim.lr': must be a finite"),
        ("optim:\n  eps: 1.0e-8\n  lrr: 1\n", [], r"train\.yaml:3: unknown config key 'optim.lrr'"),
        ("optim:\n  betas: [0.9, 2]\n", [], r"train\.yaml:2: config key 'optim.betas\[1\]'"),
        ("optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", [], r"train\.yaml:3: config key 'optim.lr' appears twice \(first on line 2\)"),
        ("eval:\n  metric: val_los\n", [], r"train\.yaml:2: config key 'eval.metric'"),
        ("- just\n- a list\n", [], r"train\.yaml:1: expected a mapping"),
        # the file's value was replaced by an override: the override is at fault, not line 2
        ("optim:\n  lr: 1.0e-4\n", ["optim.lr=-1"], r"train\.yaml: config key 'optim.lr': must be > 0"),
    ],
)  # fmt: skip
def test_yaml_errors_name_the_line(tmp_path, text, overrides, message):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(PhivisionError, match=message) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_bytes(b"method: \xff\xfe\n")
    with pytest.raises(PhivisionError, match="not a UTF-8 text file"):
        load_config(path)


# ------------------------------------------------------------------------------------- --print-config


def test_print_config_prints_the_resolved_yaml_and_exits(tmp_path):
    import yaml

    path = tmp_path / "train.yaml"
    path.write_text("method: full\noptim:\n  lr: 3.0e-5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "phivision.cli", "train", "--config", str(path), "--data", "DATA", "--model", "M",
         "--out", str(tmp_path / "run"), "optim.grad_accum=4", "--print-config"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert (
        printed["method"] == "full" and printed["optim"]["lr"] == 3e-5 and printed["optim"]["grad_accum"] == 4
    )
    assert printed["data"]["path"] == "DATA" and printed["model"] == "M"
    assert printed["schedule"]["min_lr_ratio"] == 0.0  # defaults are there too
    assert not (tmp_path / "run").exists()
    # what it prints is a config file that loads back to the same config
    again = tmp_path / "printed.yaml"
    again.write_text(proc.stdout)
    assert load_config(again).to_dict() == load_config(path, ["optim.grad_accum=4"], data={"path": "DATA"},
                                                        model="M", out=str(tmp_path / "run")).to_dict()  # fmt: skip


def test_print_config_checks_values_too(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "phivision.cli", "train", "--print-config", "optim.eps=-1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config key 'optim.eps': must be > 0, got -1.0"


# ---------------------------------------------------------------------------------------- docs/config.md

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_every_config_key_has_a_meaning():
    from phivision.options import walk_fields
    from phivision.train.config import TrainConfig

    missing = [key for key, _, spec in walk_fields(TrainConfig()) if not spec.get("help")]
    assert not missing, f"config keys without metadata={{'help': ...}}: {missing}"


def test_docs_config_md_is_up_to_date():
    from phivision.options import walk_fields
    from phivision.reference import config_reference
    from phivision.train.config import TrainConfig

    expected = config_reference()
    assert DOCS.read_text(encoding="utf-8") == expected, (
        "docs/config.md is stale: regenerate it with `python scripts/docs.py`"
    )
    for key, _, _ in walk_fields(TrainConfig()):
        assert f"| `{key}` |" in expected


def test_train_without_out_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "phivision.cli", "train", "--data", "d", "--model", "m"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --out is required: the run directory to write"
