"""The training config: small typed dataclasses, read from YAML plus ``key=value`` dotted overrides.

Every field carries its meaning in ``metadata["help"]`` (and, where it has one, its allowed values in
``metadata["choices"]`` or its range in ``metadata["check"]``): :meth:`TrainConfig.validate` checks the values
from that metadata and ``docs/config.md`` is generated from it (:func:`config_reference`), so the documentation
and the checks cannot drift apart. Unknown keys, values of the wrong type, non-finite numbers and values out of
range are rejected with a one-line :class:`ConfigError` naming the key (and the file's line, when the value came
from a YAML file), before anything is loaded. ``TrainConfig.to_dict()`` is what ``RUN/config.yaml`` holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import string
import types
import typing
from collections.abc import Iterator, Sequence
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
ANSWER_FIELDS = ("title", "category", "full_price")
SEED_MAX = 2**32 - 1  # numpy's seed range


@dataclass
class DataConfig:
    """Where the dataset lives and how training batches are drawn from it."""

    path: str = field(
        default="", metadata={"help": "Dataset directory (catalog.parquet + images/); `--data` sets it."}
    )
    batch_size: int = field(
        default=4, metadata={"help": "Rows per micro-batch on each process.", "check": ">= 1"}
    )
    group_by_length: bool = field(
        default=True, metadata={"help": "Batch rows of similar token length together (less padding)."}
    )
    max_train_samples: int = field(
        default=0,
        metadata={
            "help": "Train on the first N rows of the train split only; 0: all of them.",
            "check": ">= 0",
        },
    )
    num_workers: int = field(
        default=0,
        metadata={
            "help": "DataLoader worker processes; 0 loads batches in the training process.",
            "check": ">= 0",
        },
    )
    cache_examples: bool = field(
        default=False,
        metadata={"help": "Keep processed examples in memory after the first epoch (small datasets)."},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Concatenate examples into one padding-free row of at most max_tokens tokens per micro-batch; "
            "position ids restart for every example and attention never crosses examples. Same loss as padding, "
            "no compute spent on padding. batch_size then only sets the default budget."
        },
    )
    max_images: int = field(
        default=1,
        metadata={
            "help": "Photos of a product per prompt: its first N, in order, as <|image_1|> ... <|image_N|> "
            "(a product with fewer uses all it has). Every photo costs its image tokens (see `phivision inspect`: "
            "tokens per sample for each max_images); evaluate, predict and serve use as many as training did.",
            "check": ">= 1",
        },
    )
    max_tokens: int = field(
        default=0,
        metadata={
            "help": "Token budget of one micro-batch (per device). With packing: the packed row's length "
            "(0: batch_size x the longest example). Without: rows x longest row, padding included, so batches of "
            "short examples hold more rows (length-grouped batches; batch_size is then not used). 0: batches of "
            "batch_size rows. Checked against the longest example when the batches are planned.",
            "check": ">= 0",
        },
    )


@dataclass
class LoraConfig:
    """LoRA on the language model; optionally on the CLIP tower and the projector too."""

    r: int = field(default=16, metadata={"help": "LoRA rank.", "check": ">= 1"})
    alpha: int = field(
        default=32, metadata={"help": "LoRA scale numerator (scale = alpha / r).", "check": ">= 1"}
    )
    dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA input.", "check": "in [0, 1)"}
    )
    target_modules: list[str] = field(
        default_factory=lambda: list(LM_TARGETS),
        metadata={"help": "Language-model projections that get adapters (module names, e.g. qkv_proj)."},
    )
    vision: bool = field(
        default=False, metadata={"help": "Also LoRA on CLIP q/k/v/out_proj, fc1, fc2 (the used layers)."}
    )
    projector: bool = field(
        default=False, metadata={"help": "Also LoRA on the image projector (img_projection.0 / .2)."}
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata={"help": "Modules trained in full and saved in the adapter (e.g. img_projection.0)."},
    )


@dataclass
class FreezeConfig:
    """Parts kept frozen in full fine-tuning (LoRA freezes every base weight anyway)."""

    vision: bool = field(default=False, metadata={"help": "Full fine-tuning: keep the CLIP tower frozen."})
    projector: bool = field(
        default=False,
        metadata={"help": "Full fine-tuning: keep img_projection and the glb_GN/sub_GN separators frozen."},
    )


@dataclass
class OptimConfig:
    """AdamW and the optimizer step."""

    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate.", "check": "> 0"})
    weight_decay: float = field(
        default=0.01,
        metadata={"help": "AdamW weight decay (never on biases, norms, separators).", "check": ">= 0"},
    )
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.95],
        metadata={"help": "AdamW (beta1, beta2): two values.", "check": "in [0, 1)"},
    )
    eps: float = field(default=1e-7, metadata={"help": "AdamW epsilon.", "check": "> 0"})
    grad_clip: float = field(
        default=1.0,
        metadata={"help": "Clip the gradient norm to this; 0 disables clipping.", "check": ">= 0"},
    )
    grad_accum: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step on each process.", "check": ">= 1"}
    )


@dataclass
class ScheduleConfig:
    """How long training runs and how the learning rate moves."""

    epochs: float = field(
        default=1.0,
        metadata={
            "help": "Passes over the train split (fractions allowed); used when max_steps is 0.",
            "check": ">= 0",
        },
    )
    max_steps: int = field(
        default=0, metadata={"help": "Optimizer steps to run; 0: derived from epochs.", "check": ">= 0"}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Steps of linear warmup from lr/(warmup+1) to lr.", "check": ">= 0"}
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Warmup as a fraction of all steps; used when warmup_steps is 0.",
            "check": "in [0, 1)",
        },
    )
    decay: str = field(
        default="cosine", metadata={"help": "Learning-rate shape after warmup.", "choices": DECAYS}
    )
    min_lr_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Final learning rate as a fraction of lr (cosine and linear decay).",
            "check": "in [0, 1]",
        },
    )


@dataclass
class EvalConfig:
    """Evaluation on the val split: loss on ``max_samples`` rows and generation metrics on ``gen_samples``."""

    every_steps: int = field(
        default=0, metadata={"help": "Evaluate every N optimizer steps; 0: only at the end.", "check": ">= 0"}
    )
    max_samples: int = field(
        default=0, metadata={"help": "Val rows for the val loss; 0: the whole val split.", "check": ">= 0"}
    )
    gen_samples: int = field(
        default=32,
        metadata={
            "help": "First N val rows answered by generation and scored (parse_rate, category_accuracy, "
            "price_mape, ...); 0: val loss only.",
            "check": ">= 0",
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per evaluation batch.", "check": ">= 1"})
    max_new_tokens: int = field(
        default=48, metadata={"help": "Longest generated answer, in tokens.", "check": ">= 1"}
    )
    metric: str = field(
        default="val_loss",
        metadata={
            "help": "Picks the best evaluation (the run's weights) and drives early stopping: val_loss or a "
            "generation metric (parse_rate, price_mape, category_accuracy, title_similarity, ...)."
        },
    )
    patience: int = field(
        default=0,
        metadata={
            "help": "Stop after N evaluations without improvement; 0: never stop early.",
            "check": ">= 0",
        },
    )
    constrain: bool = field(
        default=True,
        metadata={
            "help": "Generated answers follow the answer template, the category one of the train split's "
            "(llguidance); false: free generation."
        },
    )


@dataclass
class CheckpointConfig:
    """Resumable checkpoints under RUN/checkpoints/step-N."""

    every_steps: int = field(
        default=0,
        metadata={"help": "Checkpoint every N optimizer steps; 0: only at the end.", "check": ">= 0"},
    )
    keep_last: int = field(
        default=2, metadata={"help": "Checkpoints kept (oldest deleted).", "check": ">= 1"}
    )


@dataclass
class TrackingConfig:
    """Experiment tracking; RUN/metrics.jsonl is always written."""

    backend: str = field(default="none", metadata={"help": "Experiment tracker.", "choices": TRACKERS})
    project: str = field(default="phivision", metadata={"help": "W&B project / MLflow experiment name."})
    run_name: str = field(default="", metadata={"help": "Tracker run name; empty: the run directory's name."})
    log_every: int = field(
        default=10, metadata={"help": "Log the train loss every N optimizer steps.", "check": ">= 1"}
    )
    sample_images: int = field(
        default=8,
        metadata={
            "help": "Val images logged with true and predicted answers at each evaluation.",
            "check": ">= 0",
        },
    )
    mlflow_tracking_uri: str = field(
        default="",
        metadata={"help": "MLflow tracking URI, e.g. sqlite:///mlflow.db; empty: MLflow's default."},
    )


@dataclass
class PromptConfig:
    """The exchange the model learns; saved with the run so evaluation and serving ask the same question."""

    question: str = field(default=DEFAULT_QUESTION, metadata={"help": "The user's question after the image."})
    answer_template: str = field(
        default=DEFAULT_ANSWER_TEMPLATE,
        metadata={"help": "The answer, with each of {title}, {category} and {full_price} exactly once."},
    )

    def format(self) -> PromptFormat:
        return PromptFormat(question=self.question, answer_template=self.answer_template)


@dataclass
class TrainConfig:
    """Everything one training run needs. ``model`` is the base checkpoint path or hub id."""

    model: str = field(
        default="", metadata={"help": "Base checkpoint: a local directory or a hub id; `--model`."}
    )
    out: str = field(default="", metadata={"help": "Run directory to write; `--out` sets it."})
    method: str = field(default="lora", metadata={"help": "What trains.", "choices": METHODS})
    seed: int = field(
        default=0,
        metadata={
            "help": "Seeds the data order, initialisation and dropout.",
            "check": f"in [0, {SEED_MAX}]",
        },
    )
    precision: str = field(
        default="fp32",
        metadata={"help": "Autocast precision (fp16 adds a gradient scaler).", "choices": PRECISIONS},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel.", "choices": ATTENTION}
    )
    num_crops: int = field(
        default=0,
        metadata={
            "help": "Most image tiles per image; 0: the checkpoint's preprocessor_config.json.",
            "check": ">= 0",
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (less memory, more compute)."}
    )
    ddp_find_unused_parameters: bool = field(
        default=False, metadata={"help": "DDP's find_unused_parameters (only for models changed by hand)."}
    )
    num_threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads per process; 0: torch's default.", "check": ">= 0"},
    )
    use_liger_kernel: bool = field(
        default=False,
        metadata={
            "help": "Liger's fused Triton kernels (RMSNorm, SwiGLU MLP, RoPE) in the Phi-3 decoder. CUDA only "
            "(checked before the model loads); needs the liger-kernel package (pip install 'phivision[liger]')."
        },
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset and batches."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA / QLoRA adapters."})
    freeze: FreezeConfig = field(
        default_factory=FreezeConfig, metadata={"help": "Full fine-tuning: frozen parts."}
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "AdamW."})
    schedule: ScheduleConfig = field(
        default_factory=ScheduleConfig, metadata={"help": "Length and learning rate."}
    )
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation during training."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Checkpoints."})
    tracking: TrackingConfig = field(
        default_factory=TrackingConfig, metadata={"help": "Experiment tracking."}
    )
    prompt: PromptConfig = field(
        default_factory=PromptConfig, metadata={"help": "Question and answer template."}
    )

    def validate(self) -> TrainConfig:
        """Check every value a type check cannot (ranges, choices, finiteness, metric, prompt); raises
        :class:`ConfigError` naming the key."""
        for key, value, spec in walk_fields(self):
            check_value(key, value, spec)
        if len(self.optim.betas) != 2:
            raise ConfigError("optim.betas", f"needs two values (beta1, beta2), got {len(self.optim.betas)}")
        if self.schedule.max_steps <= 0 and self.schedule.epochs <= 0:
            raise ConfigError(
                "schedule.max_steps", "one of 'schedule.epochs' and 'schedule.max_steps' must be > 0"
            )
        if self.eval.patience and not self.eval.every_steps:
            raise ConfigError("eval.patience", "early stopping needs 'eval.every_steps' > 0")
        if self.method != "full" and not (
            self.lora.target_modules or self.lora.vision or self.lora.projector
        ):
            raise ConfigError(
                "lora.target_modules", "empty, and neither lora.vision nor lora.projector is on"
            )
        check_eval_metric(self)
        check_prompt(self.prompt)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``RUN/config.yaml`` holds and ``train --print-config`` prints)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


class ConfigError(PhivisionError):
    """A bad config key or value: ``config key 'optim.lr': must be > 0, got -1.0``; ``key`` is the dotted key,
    which :func:`load_config` uses to point at the YAML line that set it."""

    def __init__(self, key: str, problem: str, unknown: bool = False):
        self.key = key
        super().__init__(
            f"unknown config key '{key}' ({problem})" if unknown else f"config key '{key}': {problem}"
        )


# ------------------------------------------------------------------------------------------ checking


def walk_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(dotted key, value, field metadata)`` for every leaf field of a config dataclass, in order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, dict(f.metadata)


_RANGE = re.compile(r"^in ([\[(])\s*(\S+),\s*(\S+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>)\s*(\S+)$")


def in_range(value: float, check: str) -> bool:
    """Whether ``value`` satisfies a check written as ``>= 1``, ``> 0``, ``in [0, 1)`` or ``in [0, 1]``."""
    if match := _BOUND.match(check):
        op, bound = match.group(1), float(match.group(2))
        return value >= bound if op == ">=" else value > bound
    if match := _RANGE.match(check):
        low_open, low, high, high_open = (
            match.group(1) == "(",
            float(match.group(2)),
            float(match.group(3)),
            match.group(4) == ")",
        )
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below
    raise ValueError(f"unknown check {check!r}")


def _show(value: Any) -> str:
    """A value as the user wrote it (plain Python numbers, never a numpy repr)."""
    if isinstance(value, float):
        return repr(float(value))
    return repr(value)


def check_value(key: str, value: Any, spec: dict[str, Any]) -> None:
    """Finite numbers, an allowed choice, a value within its ``check`` (list items each); else ConfigError."""
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        name = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(name, f"must be a finite number, got {_show(item)}")
        if "choices" in spec and item not in spec["choices"]:
            raise ConfigError(name, f"{item!r} is not one of {', '.join(spec['choices'])}")
        if "check" in spec and isinstance(item, (int, float)) and not in_range(item, spec["check"]):
            raise ConfigError(name, f"must be {spec['check']}, got {_show(item)}")
        if isinstance(item, str) and isinstance(value, list) and not item.strip():
            raise ConfigError(name, "empty name")


# ------------------------------------------------------------------------------------ eval.metric


def scalar_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers a training evaluation reports from ``phivision.evaluate.metrics.summarize`` (not ``n``)."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and k != "n"}


@functools.lru_cache(maxsize=8)
def _generation_metric_names(level_columns: tuple[str, ...]) -> tuple[str, ...]:
    import pandas as pd

    from phivision.evaluate.metrics import TrainStats, score, summarize
    from phivision.prompt import ParsedAnswer

    row = {"title": "t", "category": "c", "full_price": 1.0, **{col: "x" for col in level_columns}}
    rows = pd.DataFrame([row])
    records = score(rows, [ParsedAnswer(None, None, None)], TrainStats.from_catalog(rows))
    return tuple(sorted(scalar_metrics(summarize(records))))


def generation_metric_names(level_columns: Sequence[str] = ()) -> list[str]:
    """The generation metrics a training evaluation reports for a catalog with these ``category<k>_code``
    columns: read from what ``summarize`` actually returns for one scored row, so they never drift."""
    return list(_generation_metric_names(tuple(level_columns)))


_LEVEL_METRIC = re.compile(r"^category\d+_accuracy$")


def check_eval_metric(config: TrainConfig, level_columns: Sequence[str] | None = None) -> None:
    """``eval.metric`` must be a metric training evaluations produce: ``val_loss``, or with ``eval.gen_samples``
    > 0 a generation metric. With ``level_columns`` unknown (no catalog read yet) any ``category<k>_accuracy``
    passes; :func:`phivision.train.loop.train` checks again against the catalog's columns."""
    metric = config.eval.metric
    generated = generation_metric_names(level_columns or ())
    known = ["val_loss", *generated]
    if metric in known or (level_columns is None and _LEVEL_METRIC.match(metric)):
        if metric != "val_loss" and config.eval.gen_samples == 0:
            raise ConfigError(
                "eval.metric",
                f"{metric!r} is a generation metric, but eval.gen_samples is 0 (only val_loss is measured)",
            )
        return
    hint = "" if level_columns is None else " for this catalog"
    raise ConfigError(
        "eval.metric",
        f"{metric!r} is not a metric training evaluations report{hint} (one of: {', '.join(known)})",
    )


# ----------------------------------------------------------------------------------------- prompt


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot be an answer template, or None: it must hold each answer field exactly once,
    plain (no format spec or conversion), and no other field."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        return f"not a format string ({err}); write a literal brace as {{{{ or }}}}"
    names = [name for _, name, _, _ in parts if name is not None]
    for _, name, spec, conversion in parts:
        if name is not None and name not in ANSWER_FIELDS:
            return f"unknown field {{{name}}} (the fields are {{title}}, {{category}}, {{full_price}})"
        if name is not None and (spec or conversion):
            return f"field {{{name}}} must be plain, without a format spec or conversion"
    for name in ANSWER_FIELDS:
        if names.count(name) != 1:
            return f"must contain {{{name}}} exactly once (found {names.count(name)})"
    return None


def check_prompt(prompt: PromptConfig) -> None:
    """The answer template must be one the prompt format (and so the answer parser) accepts."""
    problem = template_problem(prompt.answer_template)
    if problem is None:
        try:
            prompt.format()  # the prompt module refuses templates its parser cannot read
        except (ValueError, TypeError) as err:
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if problem is not None:
        raise ConfigError("prompt.answer_template", problem)


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
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # `lora.target_modules=qkv_proj,o_proj` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
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
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(full, f"known: {', '.join(sorted(names))}", unknown=True)
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


def _flat_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
    return keys


def _field_type(key: str) -> Any:
    """The annotation of a dotted key of :class:`TrainConfig` (None for an unknown key)."""
    cls: Any = TrainConfig
    for part in key.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


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
        if _field_type(key) is str and not isinstance(value, str):
            value = raw  # a text key takes the text as typed: `model=0001`, `prompt.question={x}?`
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PhivisionError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def _key_lines(node: yaml.Node, path: Path, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of every mapping key in a composed YAML document; a repeated key (which
    YAML would silently resolve to its last value) is an error."""
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if key in lines:
            raise PhivisionError(
                f"{path}:{line}: config key '{key}' appears twice (first on line {lines[key]})"
            )
        lines[key] = line
        lines.update(_key_lines(value_node, path, f"{key}."))
    return lines


def read_yaml_with_lines(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """A config file's mapping and the line of each dotted key; syntax errors name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise PhivisionError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PhivisionError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise PhivisionError(f"{path}: cannot read ({err.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) if node is not None else {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(p for p in (err.context, err.problem) if p) or "invalid YAML"
        raise PhivisionError(f"{where}: not valid YAML ({problem})") from None
    except yaml.YAMLError as err:
        raise PhivisionError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PhivisionError(f"{path}:1: expected a mapping of config keys at the top level")
    return data, _key_lines(node, path)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's mapping (see :func:`read_yaml_with_lines`)."""
    return read_yaml_with_lines(path)[0]


def _locate(key: str, lines: dict[str, int], elsewhere: set[str]) -> int | None:
    """The file line that set ``key`` (or its nearest parent), unless an override set it after the file."""
    key = re.sub(r"\[\d+\]", "", key)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in elsewhere:
            return None
        if candidate in lines:
            return lines[candidate]
    return None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    **values: Any,
) -> TrainConfig:
    """YAML file (optional) <- ``values`` (e.g. model=, out=, data={"path": ...}) <- ``key=value`` overrides.

    The result is validated; an error names the key, and ``file:line`` where the value came from the file.
    """
    data, lines = read_yaml_with_lines(path) if path else ({}, {})
    later: dict[str, Any] = {}
    if values:
        later = _merge(later, values)
    if overrides:
        later = _merge(later, parse_overrides(overrides))
    data = _merge(data, later)
    try:
        return _build(TrainConfig, data).validate()
    except ConfigError as err:
        if not path:
            raise
        line = _locate(err.key, lines, _flat_keys(later))
        raise PhivisionError(f"{path}:{line}: {err}" if line else f"{path}: {err}") from None
    except PhivisionError as err:
        if not path:
            raise
        raise PhivisionError(f"{path}: {err}") from None


def cli_config(
    out: str | os.PathLike | None,
    data: str | os.PathLike | None = None,
    model: str | None = None,
    config: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """The config of ``phivision train``: ``--config`` (or, on ``--resume``, the run's own ``config.yaml``),
    then ``--data``/``--model``/``--out``, then ``key=value`` overrides."""
    saved = Path(out) / "config.yaml" if out is not None else None
    base = config if config else (saved if resume and saved is not None and saved.is_file() else None)
    values: dict[str, Any] = {} if out is None else {"out": str(out)}
    if data is not None:
        values["data"] = {"path": str(data)}
    if model is not None:
        values["model"] = str(model)
    return load_config(base, overrides, **values)
