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
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from phivision.answer.prompt import DEFAULT_ANSWER_TEMPLATE, DEFAULT_QUESTION, PromptFormat
from phivision.args import SEED, Generation, TrainArgs
from phivision.data.layout import RunLayout
from phivision.errors import PhivisionError, first_line
from phivision.evaluate.metrics import generation_metric_names
from phivision.io import ReadError, read_text_bounded
from phivision.options import (
    CONFIG,
    ConfigError,
    Naming,
    Options,
    TypeMismatch,
    coerce,
    group,
    hints,
    is_group,
    option,
)

METHODS = ("lora", "qlora", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
DECAYS = ("cosine", "linear", "constant")
TRACKERS = ("none", "wandb", "tensorboard", "mlflow")
LM_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
ANSWER_FIELDS = ("title", "category", "full_price")


@dataclass
class DataConfig(Options):
    """Where the dataset lives and how training batches are drawn from it."""

    path: str = option("", "Dataset directory (catalog.parquet + images/); `--data` sets it.")
    batch_size: int = option(4, "Rows per micro-batch on each process.", check=">= 1")
    group_by_length: bool = option(True, "Batch rows of similar token length together (less padding).")
    max_train_samples: int = option(
        0, "Train on the first N rows of the train split only; 0: all of them.", check=">= 0"
    )
    num_workers: int = option(
        0, "DataLoader worker processes; 0 loads batches in the training process.", check=">= 0"
    )
    cache_examples: bool = option(
        False, "Keep processed examples in memory after the first epoch (small datasets)."
    )
    packing: bool = option(
        False,
        "Concatenate examples into one padding-free row of at most max_tokens tokens per micro-batch; "
        "position ids restart for every example and attention never crosses examples. Same loss as padding, "
        "no compute spent on padding. batch_size then only sets the default budget.",
    )
    max_images: int = option(
        1,
        "Photos of a product per prompt: its first N, in order, as <|image_1|> ... <|image_N|> (a product with "
        "fewer uses all it has). Every photo costs its image tokens (see `phivision inspect`: tokens per sample "
        "for each max_images); evaluate, predict and serve use as many as training did.",
        check=">= 1",
    )
    max_tokens: int = option(
        0,
        "Token budget of one micro-batch (per device). With packing: the packed row's length "
        "(0: batch_size x the longest example). Without: rows x longest row, padding included, so batches of "
        "short examples hold more rows (length-grouped batches; batch_size is then not used). 0: batches of "
        "batch_size rows. Checked against the longest example when the batches are planned.",
        check=">= 0",
    )


@dataclass
class LoraConfig(Options):
    """LoRA on the language model; optionally on the CLIP tower and the projector too."""

    r: int = option(16, "LoRA rank.", check=">= 1")
    alpha: int = option(32, "LoRA scale numerator (scale = alpha / r).", check=">= 1")
    dropout: float = option(0.05, "Dropout on the LoRA input.", check="in [0, 1)")
    target_modules: list[str] = option(
        help="Language-model projections that get adapters (module names, e.g. qkv_proj).",
        factory=lambda: list(LM_TARGETS),
    )
    vision: bool = option(False, "Also LoRA on CLIP q/k/v/out_proj, fc1, fc2 (the used layers).")
    projector: bool = option(False, "Also LoRA on the image projector (img_projection.0 / .2).")
    modules_to_save: list[str] = option(
        help="Modules trained in full and saved in the adapter (e.g. img_projection.0).", factory=list
    )


@dataclass
class FreezeConfig(Options):
    """Parts kept frozen in full fine-tuning (LoRA freezes every base weight anyway)."""

    vision: bool = option(False, "Full fine-tuning: keep the CLIP tower frozen.")
    projector: bool = option(
        False, "Full fine-tuning: keep img_projection and the glb_GN/sub_GN separators frozen."
    )


@dataclass
class OptimConfig(Options):
    """AdamW and the optimizer step."""

    lr: float = option(2e-4, "Peak learning rate.", check="> 0")
    weight_decay: float = option(
        0.01, "AdamW weight decay (never on biases, norms, separators).", check=">= 0"
    )
    betas: list[float] = option(
        help="AdamW (beta1, beta2): two values.", factory=lambda: [0.9, 0.95], check="in [0, 1)"
    )
    eps: float = option(1e-7, "AdamW epsilon.", check="> 0")
    grad_clip: float = option(1.0, "Clip the gradient norm to this; 0 disables clipping.", check=">= 0")
    grad_accum: int = option(1, "Micro-batches per optimizer step on each process.", check=">= 1")


@dataclass
class ScheduleConfig(Options):
    """How long training runs and how the learning rate moves."""

    epochs: float = option(
        1.0, "Passes over the train split (fractions allowed); used when max_steps is 0.", check=">= 0"
    )
    max_steps: int = option(0, "Optimizer steps to run; 0: derived from epochs.", check=">= 0")
    warmup_steps: int = option(0, "Steps of linear warmup from lr/(warmup+1) to lr.", check=">= 0")
    warmup_ratio: float = option(
        0.0, "Warmup as a fraction of all steps; used when warmup_steps is 0.", check="in [0, 1)"
    )
    decay: str = option("cosine", "Learning-rate shape after warmup.", choices=DECAYS)
    min_lr_ratio: float = option(
        0.0, "Final learning rate as a fraction of lr (cosine and linear decay).", check="in [0, 1]"
    )


@dataclass
class EvalConfig(Generation):
    """Evaluation on the val split: loss on ``max_samples`` rows and generation metrics on ``gen_samples``; answers
    are generated as ``phivision evaluate`` generates them (``batch_size``, ``max_new_tokens``, ``constrain``)."""

    every_steps: int = option(0, "Evaluate every N optimizer steps; 0: only at the end.", check=">= 0")
    max_samples: int = option(0, "Val rows for the val loss; 0: the whole val split.", check=">= 0")
    gen_samples: int = option(
        32,
        "First N val rows answered by generation and scored (parse_rate, category_accuracy, price_mape, ...); 0: val "
        "loss only.",
        check=">= 0",
    )
    metric: str = option(
        "val_loss",
        "Picks the best evaluation (the run's weights) and drives early stopping: val_loss or a generation metric "
        "(parse_rate, price_mape, category_accuracy, title_similarity, ...).",
    )
    patience: int = option(
        0, "Stop after N evaluations without improvement; 0: never stop early.", check=">= 0"
    )
    calibrate: bool = option(
        True,
        "After training, answer the whole val split with the run's weights and calibrate the price ranges on it "
        "(RUN/calibration.json; needs eval.constrain); false: no price ranges.",
    )


@dataclass
class CheckpointConfig(Options):
    """Resumable checkpoints under RUN/checkpoints/step-N."""

    every_steps: int = option(0, "Checkpoint every N optimizer steps; 0: only at the end.", check=">= 0")
    keep_last: int = option(2, "Checkpoints kept (oldest deleted).", check=">= 1")


@dataclass
class TrackingConfig(Options):
    """Experiment tracking; RUN/metrics.jsonl is always written."""

    backend: str = option("none", "Experiment tracker.", choices=TRACKERS)
    project: str = option("phivision", "W&B project / MLflow experiment name.")
    run_name: str = option("", "Tracker run name; empty: the run directory's name.")
    log_every: int = option(10, "Log the train loss every N optimizer steps.", check=">= 1")
    sample_images: int = option(
        8, "Val images logged with true and predicted answers at each evaluation.", check=">= 0"
    )
    mlflow_tracking_uri: str = option(
        "", "MLflow tracking URI, e.g. sqlite:///mlflow.db; empty: MLflow's default."
    )


@dataclass
class PromptConfig(Options):
    """The exchange the model learns; saved with the run so evaluation and serving ask the same question."""

    question: str = option(
        DEFAULT_QUESTION,
        "The user's question after the image; {categories} in it is replaced by the train split's categories, "
        "comma-separated.",
    )
    answer_template: str = option(
        DEFAULT_ANSWER_TEMPLATE, "The answer, with each of {title}, {category} and {full_price} exactly once."
    )

    def format(self) -> PromptFormat:
        return PromptFormat(question=self.question, answer_template=self.answer_template)


@dataclass
class TrainConfig(Options):
    """Everything one training run needs. ``model`` is the base checkpoint path or hub id."""

    model: str = option("", "Base checkpoint: a local directory or a hub id; `--model`.")
    out: str = option("", "Run directory to write; `--out` sets it.")
    method: str = option("lora", "What trains.", choices=METHODS)
    seed: int = option(0, "Seeds the data order, initialisation and dropout.", check=SEED)
    precision: str = option(
        "auto",
        "Compute precision; auto: the base checkpoint's dtype where the device computes it natively (bf16 for "
        "the official model on a GPU or an AVX512-BF16/AMX CPU), else fp32 (config.yaml records the one used). "
        "fp16 adds a gradient scaler.",
        choices=PRECISIONS,
    )
    attn_implementation: str = option("sdpa", "Attention kernel.", choices=ATTENTION)
    num_crops: int = option(
        0, "Most image tiles per image; 0: the checkpoint's preprocessor_config.json.", check=">= 0"
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in backward (less memory, more compute)."
    )
    ddp_find_unused_parameters: bool = option(
        False, "DDP's find_unused_parameters (only for models changed by hand)."
    )
    num_threads: int = option(0, "torch CPU threads per process; 0: torch's default.", check=">= 0")
    use_liger_kernel: bool = option(
        False,
        "Liger's fused Triton kernels (RMSNorm, SwiGLU MLP, RoPE) in the Phi-3 decoder. CUDA only "
        "(checked before the model loads); needs the liger-kernel package (pip install 'phivision[liger]').",
    )
    data: DataConfig = group(DataConfig, "Dataset and batches.")
    lora: LoraConfig = group(LoraConfig, "LoRA / QLoRA adapters.")
    freeze: FreezeConfig = group(FreezeConfig, "Full fine-tuning: frozen parts.")
    optim: OptimConfig = group(OptimConfig, "AdamW.")
    schedule: ScheduleConfig = group(ScheduleConfig, "Length and learning rate.")
    eval: EvalConfig = group(EvalConfig, "Evaluation during training.")
    checkpoint: CheckpointConfig = group(CheckpointConfig, "Checkpoints.")
    tracking: TrackingConfig = group(TrackingConfig, "Experiment tracking.")
    prompt: PromptConfig = group(PromptConfig, "Question and answer template.")

    def validate(self, naming: Naming = CONFIG, prefix: str = "") -> TrainConfig:
        """Check every value (types, ranges, choices, finiteness, then :meth:`check`); raises
        :class:`ConfigError` naming the key."""
        super().validate(naming, prefix)
        return self

    def check(self) -> None:
        """What involves several keys: two betas, a length, early stopping, targets, the metric, the prompt."""
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``RUN/config.yaml`` holds and ``train --print-config`` prints)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------ eval.metric


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
            problem = first_line(err)
    if problem is not None:
        raise ConfigError("prompt.answer_template", problem)


# --------------------------------------------------------------------------------------------- loading


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build config group ``cls`` from a nested dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(full, f"known: {', '.join(sorted(names))}", unknown=True)
        tp = hints(cls)[key]
        if is_group(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
            continue
        try:
            kwargs[key] = coerce(value, tp, text_lists=True)
        except TypeMismatch as err:
            raise CONFIG.mismatch(full, value, err) from None
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
        known = hints(cls) if is_group(cls) else {}
        if part not in known:
            return None
        cls = known[part]
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
        text = read_text_bounded(path)
    except ReadError as err:
        if err.reason == "not_text":
            raise PhivisionError(f"{path}: not a UTF-8 text file") from None
        raise PhivisionError(f"{path}: cannot read ({err.detail})") from None
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
        raise PhivisionError(f"{path}: not valid YAML ({first_line(err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PhivisionError(f"{path}:1: expected a mapping of config keys at the top level")
    return data, _key_lines(node, path)


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
    saved = RunLayout(out).config if out is not None else None
    base = config if config else (saved if resume and saved is not None and saved.is_file() else None)
    values: dict[str, Any] = {} if out is None else {"out": str(out)}
    if data is not None:
        values["data"] = {"path": str(data)}
    if model is not None:
        values["model"] = str(model)
    return load_config(base, overrides, **values)


def resolve_config(args: TrainArgs) -> TrainConfig:
    """The config a ``train`` call runs: ``args.config`` (a YAML path or a :class:`TrainConfig`) resolved as
    :func:`cli_config` resolves ``--config``, ``args.data``/``model``/``out`` and ``args.overrides`` on top."""
    overrides = list(args.overrides or [])
    if not isinstance(args.config, TrainConfig):
        return cli_config(args.out, args.data, args.model, args.config, args.resume, overrides)
    values: dict[str, Any] = args.config.to_dict()
    if args.out is not None:
        values["out"] = str(args.out)
    if args.data is not None:
        values["data"] = {**values["data"], "path": str(args.data)}
    if args.model is not None:
        values["model"] = str(args.model)
    return load_config(None, overrides, **values)
