"""The training recipe, written out: setup -> fit (steps, evaluations, checkpoints) -> finish.

:func:`train` runs the named steps of :class:`Recipe` in order. accelerate handles devices, mixed precision and
the multi-process engines (DDP, DeepSpeed, FSDP); everything else is plain PyTorch. The loss is summed over
answer tokens and divided by the answer-token count of the whole global batch (all micro-batches of the
accumulation window, all ranks), so one process with batch 8 and two processes with batch 4 compute the same
gradient, and padding never changes a row's weight.

Everything a user can get wrong (config values, the run directory, the catalog and its images, the base
checkpoint's tensors) is checked before the first step, so a mistake costs seconds, not a run.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from tqdm.auto import tqdm

from phivision.answer.calibration import write_calibration
from phivision.answer.constrain import AnswerConstraint, short_budget_note
from phivision.answer.generate import generate_answers
from phivision.answer.prompt import parse_answer
from phivision.answer.ranges import calibrate_model
from phivision.answer.taxonomy import fill_question, model_taxonomy, with_taxonomy
from phivision.data.images import ImageError, image_size
from phivision.data.layout import RunLayout, load_catalog
from phivision.errors import PhivisionError, first_line
from phivision.evaluate.metrics import TrainStats, level_columns, scalar_metrics, score, summarize
from phivision.io import atomic_write_json, atomic_write_text, refuse_overwriting_inputs
from phivision.labels import LabelSpace, write_labels
from phivision.loading import check_model_type, load_pretrained
from phivision.model.processing_phi3_v import Phi3VProcessor
from phivision.runs import checkpoint_dtype, load_model, resolve_device, resolve_dtype
from phivision.train import checkpoint as ckpt
from phivision.train.config import TrainConfig, check_eval_metric
from phivision.train.data import (
    Batch,
    ProductDataset,
    RankBatches,
    collate_batch,
    make_plan,
    pack_examples,
    photo_paths,
    split_rows,
)
from phivision.train.kernels import apply_liger, require_liger
from phivision.train.methods import apply_method, quantization_config, trainable_summary
from phivision.train.tracking import MetricsFile, make_tracker, require_backend

LOWER_IS_BETTER = ("loss", "mape", "mae", "error", "rmse", "ape")


@dataclass
class TrainResult:
    """What a finished run reports; the same facts are in ``RUN/trainer_state.json`` and ``RUN/metrics.jsonl``."""

    out: Path
    steps: int
    train_loss: float | None
    best_metric: float | None
    best_step: int | None
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation


@dataclass
class TrainerState:
    """Where the run stands: ``RUN/trainer_state.json`` and every checkpoint's copy hold exactly this."""

    step: int = 0
    total_steps: int = 0
    metric: str = "val_loss"
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    tracker_run_id: str | None = None
    done: bool = False
    stopped_early: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record_eval(self, metrics: dict[str, float]) -> bool:
        """Add an evaluation at the current step; True when it is the best so far by ``metric``."""
        value = metrics[self.metric]
        best = self.best_metric
        improved = best is None or (value < best if lower_is_better(self.metric) else value > best)
        if improved:
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.step, 0
        else:
            self.evals_without_improvement += 1
        self.history.append({"type": "eval", "step": self.step, **metrics})
        return improved

    @property
    def last_eval_step(self) -> int:
        return self.history[-1]["step"] if self.history else -1


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def lr_factor(step: int, total: int, warmup: int, decay: str, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup, then cosine/linear decay or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


# -------------------------------------------------------------------------------- checks before work


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """``out`` must be a directory we can write (or create), and a started run is only continued on resume."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PhivisionError(f"out {run_dir}: is a file, not a run directory; pick a new --out")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PhivisionError(f"out {run_dir}: {parent} is a file, so the run directory cannot be created")
    if not os.access(parent, os.W_OK):
        raise PhivisionError(f"out {run_dir}: {parent} is not writable")
    started = RunLayout(run_dir).trainer_state.exists() or RunLayout(run_dir).checkpoints.exists()
    if started and not resume:
        raise PhivisionError(
            f"{run_dir}: already holds a training run; pass --resume to continue it or pick a new --out"
        )


def check_images(root: Path, catalog: Any, positions: Iterable[int], max_images: int = 1) -> None:
    """Read the header of every image training will use (each row's first ``max_images`` photos): an unreadable
    file or a decompression bomb stops the run here with one line naming the catalog row (1-based), not in a
    data-loader worker hours later.

    Headers only (no pixel decoding), so this costs a fraction of one epoch. ``prepare`` already decoded every
    image once; a file damaged after that (truncated pixel data) still stops the run with one line, from the
    loader (see :func:`_one_line_worker_errors`).
    """
    positions = list(positions)
    photos = [
        (pos, rel)
        for pos, paths in zip(positions, photo_paths(catalog.loc[positions], max_images), strict=True)
        for rel in paths
    ]
    for pos, rel in photos:
        path = root / rel
        where = f"{path}: catalog.parquet row {pos + 1} ('{catalog.at[pos, 'product_code']}')"
        try:
            image_size(path)
        except ImageError as err:
            if err.reason == "too_many_pixels":
                raise PhivisionError(
                    f"{where}: too many pixels, a decompression bomb? ({err.detail})"
                ) from None
            raise PhivisionError(f"{where}: not a readable image ({err})") from None


_EXCEPTION_PREFIX = re.compile(r"^[\w.]+: ")


def _one_line_worker_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """A PhivisionError raised in a DataLoader worker comes back wrapped in the worker's traceback; give it
    back as the one line it was."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except PhivisionError as err:
            text = str(err).strip()
            if "Original Traceback" not in text:
                raise
            raise PhivisionError(_EXCEPTION_PREFIX.sub("", text.splitlines()[-1])) from None
        yield batch


# --------------------------------------------------------------------------------- building blocks


def _make_accelerator(config: TrainConfig) -> Any:
    # A second run in the same process (the demo, tests) may use another precision; the process group stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    # Under torchrun without a GPU accelerate needs cpu=True to set up gloo DDP (else every rank trains alone).
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    try:
        accelerator = Accelerator(
            cpu=multi_cpu,
            mixed_precision=mixed,
            gradient_accumulation_steps=config.optim.grad_accum,
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)
            ],
        )
    except (ValueError, RuntimeError) as err:
        raise PhivisionError(f"precision={config.precision}: {first_line(err)}") from None
    if config.precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would silently train in fp32 (no fp16 autocast, no gradient scaler on CPU)
        raise PhivisionError("config key 'precision': fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return accelerator


def resolve_precision(config: TrainConfig) -> None:
    """``precision: auto``: the base checkpoint's dtype where this machine computes it natively, else fp32 (the
    policy of every verb, :func:`phivision.runs.resolve_dtype`); written back, so config.yaml records what ran."""
    if config.precision != "auto":
        return
    device = resolve_device(None)
    dtype = resolve_dtype(None, device, checkpoint_dtype(config.model))
    if dtype == torch.float16 and device.type == "cpu":
        dtype = torch.float32  # accelerate has no fp16 autocast on the CPU
    config.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _load_model(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The base model and processor. LoRA/QLoRA keep frozen base weights in the compute dtype to save memory."""
    kwargs: dict[str, Any] = {"attn_implementation": config.attn_implementation}
    if config.attn_implementation == "flash_attention_2" and not _has_flash_attn():
        raise PhivisionError(
            "attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU"
        )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    kwargs["dtype"] = (
        dtype if config.method != "full" else torch.float32
    )  # full: fp32 master weights + autocast
    if config.method == "qlora":
        kwargs["quantization_config"] = quantization_config(config)
        kwargs["device_map"] = {"": device}
    check_model_type(config.model)
    try:
        processor_kwargs = {"num_crops": config.num_crops} if config.num_crops else {}
        processor = Phi3VProcessor.from_pretrained(config.model, **processor_kwargs)
    except OSError as err:
        raise PhivisionError(f"model {config.model!r}: cannot load ({first_line(err)})") from None
    # strict: a missing, unexpected or mis-shaped tensor stops here instead of training on random weights
    model = load_pretrained(config.model, **kwargs)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    return model, processor


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward. transformers 5.2x renamed
    ``gradient_checkpointing_enable`` (a deprecated alias until v6) to ``activation_checkpointing_enable``;
    earlier 5.x releases have only the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, separators and other 1-D parameters."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise PhivisionError(f"method={config.method}: nothing to train (every parameter is frozen)")
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.optim.lr, betas=tuple(config.optim.betas), eps=config.optim.eps
    )


def answer_loss(
    model: torch.nn.Module, batch: Batch | Mapping[str, torch.Tensor], answer_only: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the answer tokens (labels != -100), and their count.

    With ``answer_only`` (the default) the LM head runs only on the positions whose next token is labelled: the
    hidden states are gathered first, so no (batch, seq, vocab) logits exist (1.3 GB in fp32 for 4 samples at
    16 crops, and as much again for their gradient). ``answer_only=False`` computes every position's logits and
    selects afterwards: the same loss and gradients, kept for benchmarks and tests.
    """
    batch = Batch.of(batch)
    labels, inputs = batch.labels, batch.model_inputs()
    targets = labels[:, 1:]
    scored = targets != -100  # position i predicts token i+1
    if answer_only:
        logits_mask = F.pad(scored, (0, 1), value=False)  # (b, t): the last position predicts nothing
        logits = model(**inputs, logits_mask=logits_mask).logits  # (answer tokens, vocab)
    else:
        logits = model(**inputs).logits[:, :-1][scored]
    loss = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
    return loss, int(scored.sum())


def _loader(
    dataset: ProductDataset, sampler: Any, processor: Any, workers: int, packing: bool = False
) -> torch.utils.data.DataLoader:
    """Batches of ``sampler``'s index lists: padded rows, or one packed row per batch with ``packing``."""
    # A private generator: creating a loader iterator must not draw from the global RNG, or a resumed run's
    # dropout masks would differ from the uninterrupted run's.
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=pack_examples if packing else functools.partial(collate_batch, processor),
        num_workers=workers,
        generator=torch.Generator(),
    )


# -------------------------------------------------------------------------------------- evaluation


def val_loss_batches(n: int, batch_size: int, rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's val-loss batches as ``(rows, counted)``: rows ``rank, rank+world, ...`` of the first ``n``,
    padded with uncounted one-row batches so every rank runs the same number of forward passes (sharded engines
    gather weights in every forward: a rank with fewer batches would leave the others waiting forever)."""
    mine = list(range(rank, n, world))
    batches = [(mine[i : i + batch_size], True) for i in range(0, len(mine), batch_size)]
    most = math.ceil(math.ceil(n / world) / batch_size) if n else 0
    return batches + [([0], False)] * (most - len(batches))


@contextlib.contextmanager
def generation_model(accelerator: Any, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module to call ``generate`` on, with every weight it needs usable on this rank.

    DDP: the wrapped module (same parameters). FSDP (v1): the root's own parameters (embeddings, head) are only
    gathered inside the root's forward, which ``generate`` bypasses, so they are gathered for the call; the
    wrapped layers gather theirs in their own forward. ZeRO-3 and FSDP2 hook every module, so the engine gathers
    each layer's weights as generation reaches it, and transformers keeps the ranks' decoding steps in sync.
    Every rank generates the same answers, so every rank runs the same collectives.
    """
    if accelerator.distributed_type == DistributedType.FSDP and isinstance(model, FSDP):
        with FSDP.summon_full_params(model, writeback=False, recurse=False):
            yield accelerator.unwrap_model(model)
        return
    yield accelerator.unwrap_model(model)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    accelerator: Any,
    processor: Any,
    val: ProductDataset,
    train_rows: Any,
    config: TrainConfig,
    progress: bool = False,
) -> tuple[dict[str, float], list[tuple[Any, str, str]]]:
    """Val loss (rows sharded over ranks, equal batch counts) and generation metrics on the first
    ``eval.gen_samples`` val rows, with progress bars on the main process when ``progress``.

    Every rank generates the same answers: cheap next to training, and required where parameters are sharded.
    """
    show = progress and accelerator.is_main_process
    was_training = model.training
    model.eval()
    n = min(len(val), config.eval.max_samples) if config.eval.max_samples else len(val)
    plan = val_loss_batches(n, config.eval.batch_size, accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    loader = _loader(val, [rows for rows, _ in plan], processor, config.data.num_workers)
    with tqdm(total=len(plan), desc="eval loss", unit="batch", leave=False, disable=not show) as bar:
        for (_, counted), batch in zip(plan, _one_line_worker_errors(loader), strict=True):
            with accelerator.autocast():
                loss, count = answer_loss(model, batch.to(accelerator.device))
            if counted:
                totals += torch.tensor([loss.item(), count], dtype=torch.float64, device=accelerator.device)
            bar.update(1)
    totals = accelerator.reduce(totals, reduction="sum")
    metrics = {"val_loss": float(totals[0] / totals[1].clamp(min=1))}

    samples: list[tuple[Any, str, str]] = []
    gen_n = min(len(val), config.eval.gen_samples)
    if gen_n:
        images = [val.images(i) for i in range(gen_n)]
        fmt = val.fmt  # the run's prompt, {categories} filled with the train split's
        labels = LabelSpace.from_rows(train_rows["category"], train_rows["currency"])
        constraint = AnswerConstraint(fmt, labels.categories) if config.eval.constrain else None
        with generation_model(accelerator, model) as generator, accelerator.autocast():
            answers = generate_answers(
                generator,
                processor,
                images,
                fmt,
                batch_size=config.eval.batch_size,
                max_new_tokens=config.eval.max_new_tokens,
                progress=show,
                constraint=constraint,
            )
        stats = TrainStats.from_catalog(train_rows)
        summary = summarize(score(val.rows.head(gen_n), [parse_answer(a, fmt) for a in answers], stats))
        metrics.update(scalar_metrics(summary))
        keep = min(gen_n, config.tracking.sample_images)
        samples = [(images[i][0], val.answer(i), answers[i]) for i in range(keep)]  # the first photo
    model.train(was_training)
    return metrics, samples


# ------------------------------------------------------------------------------------------ recipe


class Recipe:
    """One training run as named steps: :meth:`setup`, then :meth:`fit` (which calls :meth:`train_step`,
    :meth:`log_train`, :meth:`evaluate` and :meth:`save_checkpoint`), then :meth:`finish`."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.run_dir = Path(config.out)
        self.state = TrainerState(metric=config.eval.metric)
        self.last_loss: float | None = None
        self.step_lr = 0.0  # the learning rate of the last optimizer step

    # ---------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Check everything, then build the model, data, optimizer and run directory (or restore them)."""
        self.check_config()
        resolve_precision(self.config)
        self.accelerator = _make_accelerator(self.config)
        self.is_main, self.world = self.accelerator.is_main_process, self.accelerator.num_processes
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        set_seed(self.config.seed)
        self.load_data()
        self.load_model()
        self.make_optimizer()
        self.restore_checkpoint()
        self.open_run_dir()

    def check_config(self) -> None:
        config = self.config
        config.validate()
        for key, value in (("model", config.model), ("out", config.out), ("data.path", config.data.path)):
            if not value:
                raise PhivisionError(f"config key '{key}' is required")
        check_run_dir(self.run_dir, self.resume)
        refuse_overwriting_inputs(
            {"--out": self.run_dir}, [("--data", config.data.path), ("--model", config.model)]
        )
        require_backend(config.tracking.backend)
        require_liger(config.use_liger_kernel)

    def load_data(self) -> None:
        """The catalog's train and val rows; eval.metric against its columns; every image header used."""
        config = self.config
        catalog = load_catalog(config.data.path)
        check_eval_metric(config, level_columns(catalog))
        self.train_rows = split_rows(catalog, "train", config.data.max_train_samples)
        if not len(self.train_rows):
            raise PhivisionError(f"{config.data.path}: the catalog has no train rows")
        self.val_rows = split_rows(catalog, "val")
        train_positions = catalog.index[catalog["split"] == "train"][: len(self.train_rows)]
        val_positions = catalog.index[catalog["split"] == "val"]
        check_images(
            Path(config.data.path), catalog, [*train_positions, *val_positions], config.data.max_images
        )
        more = int((self.train_rows["image_paths"].map(len) > config.data.max_images).sum())
        if more:
            self.accelerator.print(
                f"data: {more} of {len(self.train_rows)} train products have more photos than "
                f"data.max_images={config.data.max_images}; only their first {config.data.max_images} are used"
            )

    def load_model(self) -> None:
        """Base model (strictly checked), the training method, and the datasets that need its processor."""
        config = self.config
        model, self.processor = _load_model(config, self.accelerator.device)
        if config.use_liger_kernel:
            apply_liger(model)
        self.model = apply_method(model, config)
        # Trained weights stay fp32: AdamW on 16-bit weights loses small updates.
        for param in self.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        categories = LabelSpace.from_rows(self.train_rows["category"], []).categories
        fmt = fill_question(config.prompt.format(), categories)
        root = config.data.path
        photos = config.data.max_images
        self.train_set = ProductDataset(
            root, self.train_rows, self.processor, fmt, cache=config.data.cache_examples, max_images=photos
        )
        self.val_set = ProductDataset(root, self.val_rows, self.processor, fmt, max_images=photos)
        if config.eval.constrain and config.eval.gen_samples and len(self.val_rows) and self.is_main:
            labels = LabelSpace.from_rows(self.train_rows["category"], self.train_rows["currency"])
            constraint = AnswerConstraint(fmt, labels.categories)
            vocab_size = model.config.vocab_size
            note = short_budget_note(
                self.processor, vocab_size, constraint, config.eval.max_new_tokens, "eval.max_new_tokens"
            )
            if note:
                print(f"warning: {note}", file=sys.stderr)

    def make_optimizer(self) -> None:
        """Batch plan, step count, AdamW and the schedule; then accelerate wraps model and optimizer."""
        config, accelerator = self.config, self.accelerator
        accum = config.optim.grad_accum
        self.plan = make_plan(self.train_set, config.data, config.seed, self.world)
        self.total_steps = config.schedule.max_steps or max(
            1, self.plan.total_micro(config.schedule.epochs) // accum
        )
        self.state.total_steps = self.total_steps
        total, warmup = (
            self.total_steps,
            config.schedule.warmup_steps or round(config.schedule.warmup_ratio * self.total_steps),
        )
        optimizer = _make_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, total, warmup, config.schedule.decay, config.schedule.min_lr_ratio),
        )
        deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
        if deepspeed is not None:  # no dataloader goes through prepare(), so DeepSpeed is told the batch here
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.data.batch_size
            deepspeed.deepspeed_config["gradient_clipping"] = config.optim.grad_clip
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        if accelerator.gradient_accumulation_steps != accum:
            raise PhivisionError(
                f"the DeepSpeed config's gradient_accumulation_steps ({accelerator.gradient_accumulation_steps}) "
                f"differs from optim.grad_accum ({accum}): set it to 'auto' or to the same value"
            )
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def restore_checkpoint(self) -> None:
        """On resume, load the newest complete checkpoint (weights, optimizer, schedule, scaler, RNG, best)."""
        weights_dir = self.run_dir / ckpt.weights_dirname(self.config.method)
        if self.is_main:
            ckpt.recover_dir(weights_dir)
        checkpoints = ckpt.list_checkpoints(self.run_dir) if self.resume else []
        if not checkpoints:
            return
        path = checkpoints[-1][1]
        saved = ckpt.load_checkpoint(
            self.accelerator, self.model, self.optimizer, self.scheduler, path, self.config.method
        )
        self.state = TrainerState.from_dict(saved)
        self.state.total_steps = self.total_steps
        self.accelerator.print(f"resuming from {path} (step {self.state.step} of {self.total_steps})")

    def open_run_dir(self) -> None:
        """The main process writes config, processor and the metrics file; it alone owns the tracker."""
        config, accelerator = self.config, self.accelerator
        self.metrics_file = MetricsFile(RunLayout(self.run_dir).metrics_log)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics_file.truncate_after(self.state.step)
            atomic_write_text(RunLayout(self.run_dir).config, config.to_yaml())
            write_labels(
                self.run_dir, LabelSpace.from_rows(self.train_rows["category"], self.train_rows["currency"])
            )
            self.processor.save_pretrained(str(RunLayout(self.run_dir).processor))
            rows = self.plan.global_batch * config.optim.grad_accum
            accelerator.print(f"{trainable_summary(self.model)}; {self.total_steps} steps of {rows} rows")
        self.tracker = make_tracker(config, self.run_dir, self.state.tracker_run_id) if self.is_main else None
        if self.tracker is not None:
            self.state.tracker_run_id = getattr(self.tracker, "run_id", None)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------ fit

    def train_batches(self) -> Iterator[Batch]:
        """This rank's micro-batches from the current step on (the order depends on the seed only)."""
        accum, accelerator = self.config.optim.grad_accum, self.accelerator
        sampler = RankBatches(
            self.plan,
            self.state.step * accum,
            self.total_steps * accum,
            accelerator.process_index,
            self.world,
        )
        loader = _loader(
            self.train_set,
            sampler,
            self.processor,
            self.config.data.num_workers,
            packing=self.config.data.packing,
        )
        for batch in _one_line_worker_errors(loader):
            yield batch.to(accelerator.device)

    def fit(self) -> None:
        """Optimizer steps until the step budget or early stopping, with logs, evaluations and checkpoints."""
        config, state = self.config, self.state
        batches = self.train_batches()
        show = self.progress and self.is_main
        self.model.train()
        self.window_loss = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        self.started = time.perf_counter()
        # closed on an error too, so the error line starts on a line of its own
        with tqdm(
            total=self.total_steps, initial=state.step, desc="train", unit="step", disable=not show
        ) as bar:
            while state.step < self.total_steps and not state.stopped_early:
                grad_norm = self.train_step([next(batches) for _ in range(config.optim.grad_accum)])
                bar.update(1)
                step = state.step
                if step % config.tracking.log_every == 0 or step == self.total_steps:
                    self.log_train(grad_norm)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}")
                if config.eval.every_steps and step % config.eval.every_steps == 0 and len(self.val_set):
                    self.evaluate()
                    self.stop_if_no_improvement()
                every = config.checkpoint.every_steps
                if every and step % every == 0 and step < self.total_steps and not state.stopped_early:
                    self.save_checkpoint()

    def train_step(self, window: list[Batch]) -> torch.Tensor | None:
        """One optimizer step over ``grad_accum`` micro-batches; returns the gradient norm (None: no clipping)."""
        accelerator, accum = self.accelerator, self.config.optim.grad_accum
        local_tokens = sum(batch.scored_tokens() for batch in window)
        tokens = accelerator.reduce(
            torch.tensor(float(local_tokens), device=accelerator.device), "sum"
        ).item()
        for batch in window:
            with accelerator.accumulate(self.model):
                loss_sum, count = answer_loss(self.model, batch)
                # accelerate divides by `accum` and DDP averages over ranks: undo both to get sum / global tokens
                accelerator.backward(loss_sum * (self.world * accum / max(tokens, 1.0)))
            self.window_loss += torch.tensor(
                [loss_sum.item(), count], dtype=torch.float64, device=accelerator.device
            )
        clip = self.config.optim.grad_clip
        grad_norm = accelerator.clip_grad_norm_(self.params, clip) if clip > 0 else None
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step ran at (logged with it)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm

    def log_train(self, grad_norm: torch.Tensor | None) -> None:
        """The mean answer-token loss since the last log, to metrics.jsonl and the tracker."""
        totals = self.accelerator.reduce(self.window_loss, reduction="sum")
        self.last_loss = float(totals[0] / totals[1].clamp(min=1))
        self.window_loss.zero_()
        step = self.state.step
        record = {
            "type": "train",
            "step": step,
            "epoch": round(self.plan.epoch_of(step * self.config.optim.grad_accum), 4),
            "loss": self.last_loss,
            "lr": self.step_lr,
            "tokens": int(totals[1]),
            "elapsed_s": round(time.perf_counter() - self.started, 2),
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.is_main:
            self.metrics_file.append(record)
            self.tracker.log({f"train/{k}": v for k, v in record.items() if k not in ("type", "step")}, step)

    def evaluate(self) -> dict[str, float]:
        """Evaluate on the val split; the best evaluation's weights become the run's weights."""
        accelerator, state = self.accelerator, self.state
        metrics, samples = evaluate_model(
            self.model, accelerator, self.processor, self.val_set, self.train_rows, self.config, self.progress
        )
        if state.metric not in metrics:  # validated before the run; a guard against a metric that vanished
            raise PhivisionError(
                f"config key 'eval.metric': {state.metric!r} is not one of {', '.join(sorted(metrics))}"
            )
        improved = state.record_eval(metrics)
        if self.is_main:
            self.metrics_file.append(state.history[-1])
            self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, state.step)
            self.tracker.log_samples(samples, state.step)
        if improved:
            ckpt.save_weights(
                accelerator, self.model, self.run_dir / ckpt.weights_dirname(self.config.method)
            )
        accelerator.wait_for_everyone()
        return metrics

    def stop_if_no_improvement(self) -> None:
        patience, state = self.config.eval.patience, self.state
        if patience and state.evals_without_improvement >= patience:
            state.stopped_early = True
            self.accelerator.print(
                f"early stop at step {state.step}: no better {state.metric} in {patience} evaluations"
            )

    def save_checkpoint(self) -> None:
        """``checkpoints/step-N`` (all ranks), then ``trainer_state.json`` beside the run's weights."""
        config = self.config
        ckpt.save_checkpoint(
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.state.to_dict(),
            self.run_dir,
            config.method,
            config.checkpoint.keep_last,
        )
        if self.is_main:
            atomic_write_json(RunLayout(self.run_dir).trainer_state, self.state.to_dict())

    # --------------------------------------------------------------------------------- finish

    def finish(self) -> TrainResult:
        """A last evaluation if the last step had none, the final checkpoint, and the result."""
        state = self.state
        metrics = state.history[-1] if state.history else {}
        if len(self.val_set) and state.last_eval_step != state.step:
            metrics = {"type": "eval", "step": state.step, **self.evaluate()}
        if not len(self.val_set):  # no evaluation: the run's weights are the last ones
            ckpt.save_weights(
                self.accelerator, self.model, self.run_dir / ckpt.weights_dirname(self.config.method)
            )
        state.done = True
        self.save_checkpoint()
        if self.is_main:
            self.tracker.finish()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return TrainResult(
            out=self.run_dir,
            steps=state.step,
            train_loss=self.last_loss,
            best_metric=state.best_metric,
            best_step=state.best_step,
            metrics={k: v for k, v in metrics.items() if k not in ("type", "step")},
            stopped_early=state.stopped_early,
            history=state.history,
        )


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune ``config.model`` on the train split of ``config.data.path`` and write the run to ``config.out``.

    Args:
        config: the resolved config (see :func:`phivision.train.config.load_config`).
        resume: continue from the newest complete checkpoint in ``config.out/checkpoints`` (fresh start if none).
        progress: show tqdm bars (training and each evaluation) on the main process.

    Returns:
        A :class:`TrainResult`; the run directory holds the weights (the best evaluation's, else the last).
    """
    recipe = Recipe(config, resume=resume, progress=progress)
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    calibrate = recipe.is_main and config.eval.calibrate and config.eval.constrain and len(recipe.val_set)
    recipe.accelerator.free_memory()  # the training model goes before the run's weights load
    del recipe
    if calibrate:
        calibrate_run(config, progress)
    return result


def calibrate_run(config: TrainConfig, progress: bool = True) -> Path:
    """Load the finished run (its best weights) and calibrate its price ranges on the whole val split:
    ``RUN/calibration.json``, which predict, serve and evaluate then use."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    loaded = load_model(config.out)
    loaded = with_taxonomy(loaded, model_taxonomy(loaded))
    calibration = calibrate_model(
        loaded,
        config.data.path,
        "val",
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        progress=progress,
    )
    return write_calibration(config.out, calibration)
