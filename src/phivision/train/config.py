"""The training config: small typed dataclasses, read from YAML plus ``key=value`` dotted overrides.

Unknown keys and values of the wrong type are rejected with a one-line :class:`PhivisionError`, so a typo in a
config never silently trains with a default. ``TrainConfig.to_dict()`` is what ``RUN/config.yaml`` holds.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phivision.errors import PhivisionError
from phivision.prompt import DEFAULT_ANSWER_TEMPLATE, DEFAULT_QUESTION, PromptFormat

METHODS = ("lora", "qlora", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
DECAYS = ("cosine", "linear", "constant")
TRACKERS = ("none", "wandb", "tensorboard", "mlflow")
LM_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@dataclass
class DataConfig:
    """Where the dataset lives and how training batches are drawn from it."""

    path: str = ""
    batch_size: int = 4  # per device
    group_by_length: bool = True  # batches of similar length pad less
    max_train_samples: int = 0  # 0: all of the train split
    num_workers: int = 0
    cache_examples: bool = False  # keep processed examples in memory after the first epoch (small datasets)
    packing: bool = field(
        default=False,
        metadata={
            "help": "Concatenate examples into one padding-free row of at most max_tokens tokens per micro-batch; "
            "position ids restart for every example and attention never crosses examples. Same loss as padding, "
            "no compute spent on padding. batch_size then only sets the default budget."
        },
    )
    max_tokens: int = field(
        default=0,
        metadata={
            "help": "Token budget of one micro-batch (per device). With packing: the packed row's length "
            "(0: batch_size x the longest example). Without: rows x longest row, padding included, so batches of "
            "short examples hold more rows (length-grouped batches; batch_size is then not used). 0: batches of "
            "batch_size rows."
        },
    )


@dataclass
class LoraConfig:
    """LoRA on the language model; optionally on the CLIP tower and the projector too."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LM_TARGETS))
    vision: bool = False  # LoRA on CLIP q/k/v/out_proj, fc1, fc2
    projector: bool = False  # LoRA on img_projection.0 / .2
    modules_to_save: list[str] = field(default_factory=list)  # trained in full and saved in the adapter


@dataclass
class FreezeConfig:
    """Parts kept frozen in full fine-tuning (LoRA freezes every base weight anyway)."""

    vision: bool = False  # the CLIP tower
    projector: bool = False  # img_projection and the glb_GN/sub_GN separators


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-7
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1


@dataclass
class ScheduleConfig:
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0: derived from epochs
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    decay: str = "cosine"
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation on the val split: loss on ``max_samples`` rows and generation metrics on ``gen_samples``."""

    every_steps: int = 0  # 0: only at the end
    max_samples: int = 0  # 0: the whole val split for the loss
    gen_samples: int = 32  # rows answered by generation for parse_rate/category_accuracy/price_mape
    batch_size: int = 8
    max_new_tokens: int = 48
    metric: str = "val_loss"  # chooses the best checkpoint and drives early stopping
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    constrain: bool = True  # generated answers follow the template, category one of the train split's


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 2


@dataclass
class TrackingConfig:
    backend: str = "none"
    project: str = "phivision"
    run_name: str = ""
    log_every: int = 10
    sample_images: int = 8  # rows of the eval table (image, true answer, predicted answer)
    mlflow_tracking_uri: str = ""  # e.g. sqlite:///mlflow.db; empty: MLflow's default


@dataclass
class PromptConfig:
    question: str = DEFAULT_QUESTION
    answer_template: str = DEFAULT_ANSWER_TEMPLATE

    def format(self) -> PromptFormat:
        return PromptFormat(question=self.question, answer_template=self.answer_template)


@dataclass
class TrainConfig:
    """Everything one training run needs. ``model`` is the base checkpoint path or hub id."""

    model: str = ""
    out: str = ""
    method: str = "lora"
    seed: int = 0
    precision: str = "fp32"
    attn_implementation: str = "sdpa"
    num_crops: int = 0  # 0: the checkpoint's preprocessor_config.json value
    gradient_checkpointing: bool = False
    ddp_find_unused_parameters: bool = False
    num_threads: int = 0  # torch CPU threads per process; 0: torch's default (1 is fastest for tiny models)
    use_liger_kernel: bool = field(
        default=False,
        metadata={
            "help": "Liger's fused Triton kernels (RMSNorm, SwiGLU MLP, RoPE) in the Phi-3 decoder. CUDA only; "
            "needs the liger-kernel package (pip install 'phivision[liger]')."
        },
    )
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def validate(self) -> TrainConfig:
        """Check the values a type check cannot; raises PhivisionError naming the key."""
        choices = {
            "method": (self.method, METHODS),
            "precision": (self.precision, PRECISIONS),
            "attn_implementation": (self.attn_implementation, ATTENTION),
            "schedule.decay": (self.schedule.decay, DECAYS),
            "tracking.backend": (self.tracking.backend, TRACKERS),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise PhivisionError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
        positive = {
            "data.batch_size": self.data.batch_size,
            "optim.grad_accum": self.optim.grad_accum,
            "lora.r": self.lora.r,
            "eval.batch_size": self.eval.batch_size,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "tracking.log_every": self.tracking.log_every,
        }
        for key, value in positive.items():
            if value < 1:
                raise PhivisionError(f"config key '{key}': must be >= 1, got {value}")
        if self.optim.lr <= 0:
            raise PhivisionError(f"config key 'optim.lr': must be > 0, got {self.optim.lr}")
        if self.schedule.max_steps <= 0 and self.schedule.epochs <= 0:
            raise PhivisionError("config keys 'schedule.epochs'/'schedule.max_steps': one must be > 0")
        if len(self.optim.betas) != 2:
            raise PhivisionError(f"config key 'optim.betas': needs two values, got {self.optim.betas}")
        if self.eval.patience and not self.eval.every_steps:
            raise PhivisionError("config key 'eval.patience': early stopping needs 'eval.every_steps' > 0")
        check_performance_keys(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def check_performance_keys(config: TrainConfig) -> None:
    """Ranges of the batching and kernel keys (``data.packing``, ``data.max_tokens``, ``use_liger_kernel``).

    Whether Liger can run (CUDA, the package) is checked by :func:`phivision.train.kernels.require_liger`
    before the model loads, not here: validating a config imports no torch.
    """
    data = config.data
    if data.max_tokens < 0:
        raise PhivisionError(
            f"config key 'data.max_tokens': must be >= 0 (0: no token budget), got {data.max_tokens}"
        )
    # That the budget holds the longest example is checked when the batch plan is made (it needs the data).


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the command line are parsed where safe."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except PhivisionError:
                pass
        raise PhivisionError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # `lora.target_modules=qkv_proj,o_proj` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise PhivisionError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise PhivisionError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise PhivisionError(
            f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise PhivisionError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "lora.vision=true"]`` -> nested dict; values are read as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise PhivisionError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PhivisionError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PhivisionError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "invalid YAML"
        raise PhivisionError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise PhivisionError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    **values: Any,
) -> TrainConfig:
    """YAML file (optional) <- ``values`` (e.g. model=, out=, data={"path": ...}) <- ``key=value`` overrides."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    if values:
        data = _merge(data, values)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    where = f"{path}: " if path else ""
    try:
        return _build(TrainConfig, data).validate()
    except PhivisionError as err:
        raise PhivisionError(f"{where}{err}") from None


def cli_config(
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    model: str | None = None,
    config: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """The config of ``phivision train``: ``--config`` (or, on ``--resume``, the run's own ``config.yaml``),
    then ``--data``/``--model``/``--out``, then ``key=value`` overrides."""
    saved = Path(out) / "config.yaml"
    base = config if config else (saved if resume and saved.is_file() else None)
    values: dict[str, Any] = {"out": str(out)}
    if data is not None:
        values["data"] = {"path": str(data)}
    if model is not None:
        values["model"] = str(model)
    return load_config(base, overrides, **values)
