"""The training recipe, written out: setup -> fit (steps, eval, checkpoints) -> export.

accelerate handles devices, mixed precision and the multi-process engines (DDP, DeepSpeed, FSDP); everything
else is plain PyTorch. The loss is summed over answer tokens and divided by the answer-token count of the whole
global batch (all micro-batches of the accumulation window, all ranks), so one process with batch 8 and two
processes with batch 4 compute the same gradient, and padding never changes a row's weight.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from phivision.errors import PhivisionError
from phivision.io import atomic_write_json, atomic_write_text
from phivision.labels import LabelSpace, write_labels
from phivision.train import checkpoint as ckpt
from phivision.train.config import TrainConfig
from phivision.train.data import ProductDataset, RankBatches, make_plan, pack_examples, split_rows
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


def _make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    # A second run in the same process (the demo, tests) may use another precision; the process group stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    # Under torchrun without a GPU accelerate needs cpu=True to set up gloo DDP (else every rank trains alone).
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    try:
        return Accelerator(
            cpu=multi_cpu,
            mixed_precision=mixed,
            gradient_accumulation_steps=config.optim.grad_accum,
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)
            ],
        )
    except (ValueError, RuntimeError) as err:
        raise PhivisionError(f"precision={config.precision}: {str(err).splitlines()[0]}") from None


def _load_model(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The base model and processor. LoRA/QLoRA keep frozen base weights in the compute dtype to save memory."""
    import phivision.model  # noqa: F401  (registers phi3_v with transformers)
    from phivision.model.modeling_phi3_v import Phi3VForCausalLM
    from phivision.model.processing_phi3_v import Phi3VProcessor

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
    try:
        processor_kwargs = {"num_crops": config.num_crops} if config.num_crops else {}
        processor = Phi3VProcessor.from_pretrained(config.model, **processor_kwargs)
        model = Phi3VForCausalLM.from_pretrained(config.model, **kwargs)
    except OSError as err:
        raise PhivisionError(f"model {config.model!r}: cannot load ({str(err).splitlines()[0]})") from None
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model, processor


def _has_flash_attn() -> bool:
    import importlib.util

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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def answer_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], answer_only: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the answer tokens (labels != -100), and their count.

    With ``answer_only`` (the default) the LM head runs only on the positions whose next token is labelled: the
    hidden states are gathered first, so no (batch, seq, vocab) logits exist (1.3 GB in fp32 for 4 samples at
    16 crops, and as much again for their gradient). ``answer_only=False`` computes every position's logits and
    selects afterwards: the same loss and gradients, kept for benchmarks and tests.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
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
        collate_fn=pack_examples if packing else processor.collate,
        num_workers=workers,
        generator=torch.Generator(),
    )


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    accelerator: Any,
    processor: Any,
    val: ProductDataset,
    train_rows: Any,
    config: TrainConfig,
) -> tuple[dict[str, float], list[tuple[Any, str, str]]]:
    """Val loss (rows sharded over ranks) and generation metrics on the first ``eval.gen_samples`` val rows.

    Every rank generates the same answers: cheap next to training, and required where parameters are sharded.
    """
    from phivision.evaluate.constrain import AnswerConstraint
    from phivision.evaluate.generate import generate_answers
    from phivision.evaluate.metrics import TrainStats, score, summarize
    from phivision.prompt import parse_answer

    was_training = model.training
    model.eval()
    n = min(len(val), config.eval.max_samples) if config.eval.max_samples else len(val)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    batches = [mine[i : i + config.eval.batch_size] for i in range(0, len(mine), config.eval.batch_size)]
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in _loader(val, batches, processor, config.data.num_workers):
        with accelerator.autocast():
            loss, count = answer_loss(model, _to_device(batch, accelerator.device))
        totals += torch.tensor([loss.item(), count], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    metrics = {"val_loss": float(totals[0] / totals[1].clamp(min=1))}

    samples: list[tuple[Any, str, str]] = []
    gen_n = min(len(val), config.eval.gen_samples)
    if gen_n:
        images = [val.image(i) for i in range(gen_n)]
        fmt = config.prompt.format()
        labels = LabelSpace.from_rows(train_rows["category"], train_rows["currency"])
        constraint = AnswerConstraint(fmt, labels.categories) if config.eval.constrain else None
        with accelerator.autocast():
            answers = generate_answers(
                accelerator.unwrap_model(model),
                processor,
                images,
                fmt,
                batch_size=config.eval.batch_size,
                max_new_tokens=config.eval.max_new_tokens,
                progress=False,
                constraint=constraint,
            )
        stats = TrainStats.from_catalog(train_rows)
        summary = summarize(score(val.rows.head(gen_n), [parse_answer(a, fmt) for a in answers], stats))
        metrics.update({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and k != "n"})
        keep = min(gen_n, config.tracking.sample_images)
        samples = [(images[i], val.answer(i), answers[i]) for i in range(keep)]
    model.train(was_training)
    return metrics, samples


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    started = (run_dir / "trainer_state.json").exists() or (run_dir / "checkpoints").exists()
    if started and not resume:
        raise PhivisionError(
            f"{run_dir}: already holds a training run; pass --resume to continue it or pick a new --out"
        )


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune ``config.model`` on the train split of ``config.data.path`` and write the run to ``config.out``.

    Args:
        config: the resolved config (see :func:`phivision.train.config.load_config`).
        resume: continue from the newest complete checkpoint in ``config.out/checkpoints`` (fresh start if none).
        progress: show a tqdm bar on the main process.

    Returns:
        A :class:`TrainResult`; the run directory holds the weights (the best evaluation's, else the last).
    """
    config.validate()
    for key, value in (("model", config.model), ("out", config.out), ("data.path", config.data.path)):
        if not value:
            raise PhivisionError(f"config key '{key}' is required")
    run_dir = Path(config.out)
    _check_run_dir(run_dir, resume)
    require_backend(config.tracking.backend)
    require_liger(config.use_liger_kernel)
    from accelerate.utils import set_seed

    from phivision.data import load_catalog

    accelerator = _make_accelerator(config)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)

    catalog = load_catalog(config.data.path)
    train_rows = split_rows(catalog, "train", config.data.max_train_samples)
    if not len(train_rows):
        raise PhivisionError(f"{config.data.path}: the catalog has no train rows")
    model, processor = _load_model(config, accelerator.device)
    if config.use_liger_kernel:
        apply_liger(model)
    model = apply_method(model, config)
    # Trained weights stay fp32: AdamW on 16-bit weights loses small updates.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    fmt = config.prompt.format()
    train_set = ProductDataset(config.data.path, train_rows, processor, fmt, cache=config.data.cache_examples)
    val_set = ProductDataset(config.data.path, split_rows(catalog, "val"), processor, fmt)

    accum = config.optim.grad_accum
    plan = make_plan(train_set, config.data, config.seed, world)
    total_steps = config.schedule.max_steps or max(1, plan.total_micro(config.schedule.epochs) // accum)
    warmup = config.schedule.warmup_steps or round(config.schedule.warmup_ratio * total_steps)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, warmup, config.schedule.decay, config.schedule.min_lr_ratio),
    )
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # no dataloader goes through prepare(), so DeepSpeed is told the batch here
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.data.batch_size
        deepspeed.deepspeed_config["gradient_clipping"] = config.optim.grad_clip
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.gradient_accumulation_steps != accum:
        raise PhivisionError(
            f"the DeepSpeed config's gradient_accumulation_steps ({accelerator.gradient_accumulation_steps}) "
            f"differs from optim.grad_accum ({accum}): set it to 'auto' or to the same value"
        )

    method, metric = config.method, config.eval.metric
    weights_dir = run_dir / ckpt.weights_dirname(method)
    metrics_file = MetricsFile(run_dir / "metrics.jsonl")
    state: dict[str, Any] = {
        "step": 0,
        "total_steps": total_steps,
        "metric": metric,
        "best_metric": None,
        "best_step": None,
        "evals_without_improvement": 0,
        "history": [],
        "tracker_run_id": None,
        "done": False,
        "stopped_early": False,
    }
    checkpoints = ckpt.list_checkpoints(run_dir) if resume else []
    if is_main:
        ckpt.recover_dir(weights_dir)
    if checkpoints:
        state = ckpt.load_checkpoint(accelerator, model, optimizer, scheduler, checkpoints[-1][1], method)
        accelerator.print(f"resuming from {checkpoints[-1][1]} (step {state['step']} of {total_steps})")
        state["total_steps"] = total_steps
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file.truncate_after(state["step"])
        atomic_write_text(run_dir / "config.yaml", config.to_yaml())
        write_labels(run_dir, LabelSpace.from_rows(train_rows["category"], train_rows["currency"]))
        processor.save_pretrained(str(run_dir / "processor"))
        accelerator.print(
            f"{trainable_summary(model)}; {total_steps} steps of {plan.global_batch * accum} rows"
        )
    tracker = make_tracker(config, run_dir, state.get("tracker_run_id")) if is_main else None
    if tracker is not None:
        state["tracker_run_id"] = getattr(tracker, "run_id", None)
    accelerator.wait_for_everyone()

    def save_state_files() -> None:
        atomic_write_json(run_dir / "trainer_state.json", state)

    def run_eval(step: int) -> dict[str, float]:
        metrics, samples = evaluate_model(model, accelerator, processor, val_set, train_rows, config)
        if metric not in metrics:
            raise PhivisionError(
                f"config key 'eval.metric': {metric!r} is not one of {', '.join(sorted(metrics))}"
            )
        value = metrics[metric]
        best = state["best_metric"]
        improved = best is None or (value < best if lower_is_better(metric) else value > best)
        if improved:
            state.update(best_metric=value, best_step=step, evals_without_improvement=0)
        else:
            state["evals_without_improvement"] += 1
        record = {"type": "eval", "step": step, **metrics}
        state["history"].append(record)
        if is_main:
            metrics_file.append(record)
            tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
            tracker.log_samples(samples, step)
        if improved:  # keep the best weights as the run's weights
            ckpt.save_weights(accelerator, model, weights_dir)
        accelerator.wait_for_everyone()
        return metrics

    step = state["step"]
    last_loss: float | None = None
    last_eval_step = state["history"][-1]["step"] if state["history"] else -1
    evaluate_every, save_every = config.eval.every_steps, config.checkpoint.every_steps
    clip = config.optim.grad_clip
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(
        _loader(
            train_set,
            RankBatches(plan, step * accum, total_steps * accum, accelerator.process_index, world),
            processor,
            config.data.num_workers,
            packing=config.data.packing,
        )
    )
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and is_main))
    model.train()
    window_loss = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, tokens since log
    started = time.perf_counter()
    while step < total_steps and not state["stopped_early"]:
        window = [_to_device(next(batches), accelerator.device) for _ in range(accum)]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        tokens = accelerator.reduce(
            torch.tensor(float(local_tokens), device=accelerator.device), "sum"
        ).item()
        for batch in window:
            with accelerator.accumulate(model):
                loss_sum, count = answer_loss(model, batch)
                # accelerate divides by `accum` and DDP averages over ranks: undo both to get sum / global tokens
                accelerator.backward(loss_sum * (world * accum / max(tokens, 1.0)))
            window_loss += torch.tensor(
                [loss_sum.item(), count], dtype=torch.float64, device=accelerator.device
            )
        grad_norm = accelerator.clip_grad_norm_(params, clip) if clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state["step"] = step
        bar.update(1)

        if step % config.tracking.log_every == 0 or step == total_steps:
            totals = accelerator.reduce(window_loss, reduction="sum")
            last_loss = float(totals[0] / totals[1].clamp(min=1))
            window_loss.zero_()
            record = {
                "type": "train",
                "step": step,
                "epoch": round(plan.epoch_of(step * accum), 4),
                "loss": last_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens": int(totals[1]),
                "elapsed_s": round(time.perf_counter() - started, 2),
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if is_main:
                metrics_file.append(record)
                tracker.log({f"train/{k}": v for k, v in record.items() if k not in ("type", "step")}, step)
                bar.set_postfix(loss=f"{last_loss:.4f}")
        if evaluate_every and step % evaluate_every == 0 and len(val_set):
            run_eval(step)
            last_eval_step = step
            patience = config.eval.patience
            if patience and state["evals_without_improvement"] >= patience:
                state["stopped_early"] = True
                accelerator.print(f"early stop at step {step}: no better {metric} in {patience} evaluations")
        if save_every and step % save_every == 0 and step < total_steps and not state["stopped_early"]:
            ckpt.save_checkpoint(
                accelerator, model, optimizer, scheduler, state, run_dir, method, config.checkpoint.keep_last
            )
            if is_main:
                save_state_files()
    bar.close()

    metrics = state["history"][-1] if state["history"] else {}
    if len(val_set) and last_eval_step != step:
        metrics = {"type": "eval", "step": step, **run_eval(step)}
    if not len(val_set):  # no evaluation: the run's weights are the last ones
        ckpt.save_weights(accelerator, model, weights_dir)
    state["done"] = True
    ckpt.save_checkpoint(
        accelerator, model, optimizer, scheduler, state, run_dir, method, config.checkpoint.keep_last
    )
    if is_main:
        save_state_files()
        tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        out=run_dir,
        steps=step,
        train_loss=last_loss,
        best_metric=state["best_metric"],
        best_step=state["best_step"],
        metrics={k: v for k, v in metrics.items() if k not in ("type", "step")},
        stopped_early=state["stopped_early"],
        history=state["history"],
    )
