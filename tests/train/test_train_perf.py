"""Issue 9, performance: answer-only logits, packed rows, token-budget batches, the Liger switch.

Every faster path is checked against the plain one on the real processor's examples from the sample catalog:
same loss, same gradients.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from phivision.answer.prompt import PromptFormat
from phivision.data import load_catalog
from phivision.errors import PhivisionError
from phivision.model import Phi3VForCausalLM, modeling_phi3_v
from phivision.model.processing_phi3_v import Phi3VProcessor
from phivision.train import train
from phivision.train.config import LoraConfig, TrainConfig
from phivision.train.data import BatchPlan, ProductDataset, make_plan, pack_examples, split_rows
from phivision.train.loop import answer_loss, enable_activation_checkpointing
from phivision.train.methods import apply_method
from phivision.train.tracking import read_metrics


@pytest.fixture(scope="module")
def train_set(tiny_checkpoint, sample_dataset):
    rows = split_rows(load_catalog(sample_dataset), "train")
    return ProductDataset(
        sample_dataset, rows, Phi3VProcessor.from_pretrained(tiny_checkpoint), PromptFormat()
    )


def tiny_model(
    checkpoint, attn: str = "sdpa", lora: bool = False, checkpointing: bool = False, vision: bool = False
) -> torch.nn.Module:
    torch.manual_seed(0)  # the same LoRA A matrices for every model built here
    model = Phi3VForCausalLM.from_pretrained(checkpoint, attn_implementation=attn)
    model.config.use_cache = False
    if checkpointing:  # before LoRA, as the training recipe does
        enable_activation_checkpointing(model)
    if lora:
        config = LoraConfig(dropout=0.0, vision=vision)
        model = apply_method(model, TrainConfig(method="lora", lora=config))
    return model.train()


def loss_and_grads(model, batch, answer_only: bool = True):
    model.zero_grad(set_to_none=True)
    loss, count = answer_loss(model, batch, answer_only=answer_only)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), count, grads


def assert_same_loss_and_grads(a, b, tol: float = 1e-5) -> None:
    (loss_a, count_a, grads_a), (loss_b, count_b, grads_b) = a, b
    assert count_a == count_b > 0
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------ answer-only logits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_answer_only_logits_give_the_same_loss_and_gradients(train_set, tiny_checkpoint, lora):
    torch.manual_seed(0)
    model = tiny_model(tiny_checkpoint, lora=lora)
    batch = train_set.processor.collate([train_set[i] for i in range(4)])
    assert_same_loss_and_grads(loss_and_grads(model, batch, True), loss_and_grads(model, batch, False))


# ------------------------------------------------------------------------------------ tiled MLP, frozen CLIP


def positions_per_call(module: torch.nn.Module) -> list[int]:
    """The number of positions of every input ``module`` sees from now on (filled in as it runs)."""
    seen: list[int] = []
    module.register_forward_hook(lambda _module, args, _out: seen.append(args[0].shape[:-1].numel()))
    return seen


def test_mlp_tiles_under_gradient_checkpointing_give_the_same_loss_and_gradients(
    train_set, tiny_checkpoint, monkeypatch
):
    batch = train_set.processor.collate([train_set[i] for i in range(4)])
    expected = loss_and_grads(tiny_model(tiny_checkpoint, lora=True), batch)
    monkeypatch.setattr(modeling_phi3_v, "MLP_TILE_POSITIONS", 16)
    model = tiny_model(tiny_checkpoint, lora=True, checkpointing=True)
    rows = positions_per_call(model.base_model.model.model.layers[0].mlp.gate_up_proj)
    got = loss_and_grads(model, batch)
    assert_same_loss_and_grads(expected, got)
    tiles = math.ceil(batch["input_ids"].numel() / 16)
    # 16 positions at most per call; every tile runs in the forward pass and again for its own backward (the
    # layer's recompute adds calls too, as far as its early stop lets it run)
    assert max(rows) == 16 and len(rows) > 2 * tiles


def test_mlp_is_not_tiled_without_gradient_checkpointing_or_outside_training(
    train_set, tiny_checkpoint, monkeypatch
):
    batch = train_set.processor.collate([train_set[i] for i in range(2)])
    monkeypatch.setattr(modeling_phi3_v, "MLP_TILE_POSITIONS", 16)
    for model in (tiny_model(tiny_checkpoint), tiny_model(tiny_checkpoint, checkpointing=True).eval()):
        rows = positions_per_call(model.model.layers[0].mlp.gate_up_proj)
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        assert rows == [batch["input_ids"].numel()]


@pytest.mark.parametrize("vision", [False, True], ids=["frozen-clip", "clip-lora"])
def test_a_frozen_clip_tower_builds_no_autograd_graph(train_set, tiny_checkpoint, vision):
    """With gradient checkpointing, transformers marks CLIP's patch embeddings as requiring grad; a frozen tower
    must still run without a graph (no saved activations, no backward through CLIP), a trained one with it."""
    model = tiny_model(tiny_checkpoint, lora=True, checkpointing=True, vision=vision)
    projector = model.base_model.model.model.vision_embed_tokens.img_projection
    tracked = []
    projector.register_forward_pre_hook(lambda module, args: tracked.append(args[0].requires_grad))
    _, _, grads = loss_and_grads(model, train_set.processor.collate([train_set[i] for i in range(2)]))
    assert tracked == [vision]
    clip_grads = {name: g for name, g in grads.items() if "img_processor" in name}
    assert bool(clip_grads) == vision
    # (lora_A's gradient is zero at the start: lora_B starts at zero)
    assert all(g.abs().sum() > 0 for name, g in clip_grads.items() if "lora_B" in name)
    assert any("layers" in name for name in grads)  # the language model's adapters train either way


# ------------------------------------------------------------------------------------ packing


def test_lengths_are_the_examples_exact_token_counts(train_set):
    assert train_set.lengths() == [len(train_set[i]["input_ids"]) for i in range(len(train_set))]


def test_lengths_follow_exif_rotation(train_set, tmp_path):
    """A portrait photo stored landscape with an EXIF rotation tag is tokenized as the portrait it shows."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (300, 100), "red").save(tmp_path / "rotated.jpg", exif=exif)
    rows = train_set.rows.head(1).copy()
    rows.loc[0, "image_path"] = "rotated.jpg"
    rows["image_paths"] = [["rotated.jpg"]]
    dataset = ProductDataset(tmp_path, rows, train_set.processor, train_set.fmt)
    assert dataset.lengths() == [len(dataset[0]["input_ids"])]
    upright = dataset.processor.image_processor.calc_num_image_tokens(300, 100)
    assert dataset.image_tokens(0) != upright  # the stored (unrotated) size would give another count


def test_pack_examples_restarts_positions_and_keeps_images_in_order(train_set):
    examples = [train_set[i] for i in range(3)]
    packed = pack_examples(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert "attention_mask" not in packed
    assert (
        packed["input_ids"].shape
        == packed["labels"].shape
        == packed["position_ids"].shape
        == (1, sum(lengths))
    )
    starts = [sum(lengths[:i]) for i in range(3)]
    for start, example in zip(starts, examples, strict=True):
        n = len(example["input_ids"])
        assert packed["position_ids"][0, start : start + n].tolist() == list(range(n))
        assert torch.equal(packed["input_ids"][0, start : start + n], example["input_ids"])
        assert packed["labels"][0, start] == -100  # never a target of the previous example's last token
    assert torch.equal(packed["pixel_values"], torch.cat([e["pixel_values"] for e in examples]))
    assert torch.equal(packed["image_sizes"], torch.cat([e["image_sizes"] for e in examples]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_the_padded_batch_loss_and_gradients(train_set, tiny_checkpoint, attn):
    torch.manual_seed(0)
    model = tiny_model(tiny_checkpoint, attn, lora=True)
    examples = [train_set[i] for i in range(5)]
    padded = loss_and_grads(model, train_set.processor.collate(examples))
    packed = loss_and_grads(model, pack_examples(examples))
    assert_same_loss_and_grads(packed, padded)


def test_packed_row_with_gradient_checkpointing(train_set, tiny_checkpoint):
    torch.manual_seed(0)
    model = tiny_model(tiny_checkpoint)
    examples = [train_set[i] for i in range(4)]
    plain = loss_and_grads(model, pack_examples(examples))
    enable_activation_checkpointing(model)
    assert_same_loss_and_grads(loss_and_grads(model, pack_examples(examples)), plain)


# ------------------------------------------------------------------------------------ token budgets


def budget_cost(lengths, rows, packing):
    return sum(lengths[i] for i in rows) if packing else len(rows) * max(lengths[i] for i in rows)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_token_budget_batches_fit_and_use_each_row_once(packing):
    lengths = [40 + (i * 37) % 400 for i in range(300)]
    plan = BatchPlan(lengths, 0, seed=3, world=2, max_tokens=1600, packing=packing)
    again = BatchPlan(lengths, 0, seed=3, world=2, max_tokens=1600, packing=packing)
    seen = []
    for micro in range(plan.total_micro(1)):
        parts = [plan.rank_batch(micro, rank, 2) for rank in (0, 1)]
        assert parts == [again.rank_batch(micro, rank, 2) for rank in (0, 1)]  # a function of the seed
        assert all(part and budget_cost(lengths, part, packing) <= 1600 for part in parts)
        assert parts[0] + parts[1] == plan.global_batch_at(micro)
        seen += parts[0] + parts[1]
    assert len(seen) == len(set(seen)) > 0.9 * len(lengths)  # each row at most once, few dropped
    real = sum(lengths[i] for i in seen)
    budget = 2 * 1600 * plan.total_micro(1)
    assert real > 0.8 * budget  # batches are full: length grouping leaves little padding
    assert plan.epoch(1) != plan.epoch(0)


def test_token_budget_epochs_of_different_sizes_are_counted_exactly():
    lengths = [40 + (i * 53) % 300 for i in range(200)]
    plan = BatchPlan(lengths, 0, seed=1, max_tokens=900)
    first, second = len(plan.epoch(0)), len(plan.epoch(1))
    assert plan.total_micro(2) == first + second
    assert plan.total_micro(1.5) == first + math.floor(0.5 * second)
    assert plan.epoch_of(first) == 1.0
    assert plan.global_batch_at(first + 2) == plan.epoch(1)[2]


def test_fixed_batches_are_unchanged_by_the_token_budget_code():
    """Without a budget, the plan is the one runs made before (resume of an older run finds the same batches)."""
    lengths = [5, 50, 7, 48, 6, 52, 8, 49, 30, 31, 29, 33]
    plan = BatchPlan(lengths, 4, seed=1)
    assert plan.epoch(0) == [[11, 9, 8, 10], [5, 1, 7, 3], [6, 2, 4, 0]]  # as printed by the code before
    assert plan.global_batch == 4 and plan.total_micro(2.5) == 7


def test_a_budget_below_the_longest_example_names_the_key(train_set):
    config = TrainConfig()
    config.data.max_tokens = max(train_set.lengths()) - 1
    with pytest.raises(PhivisionError, match=r"data\.max_tokens.*longest train example.*product"):
        make_plan(train_set, config.data, seed=0, world=1)


def test_packing_without_a_budget_holds_a_padded_batch_of_the_longest_rows(train_set):
    config = TrainConfig()
    config.data.packing, config.data.batch_size = True, 3
    plan = make_plan(train_set, config.data, seed=0, world=1)
    assert plan.max_tokens == 3 * max(train_set.lengths())
    # at least as many rows per packed row as the padded batch holds (more where rows are shorter than the longest)
    assert len(plan.epoch(0)) <= len(train_set) // 3


def test_negative_max_tokens_is_a_config_error(quick_config):
    with pytest.raises(PhivisionError, match=r"data\.max_tokens.*>= 0"):
        quick_config("bad", "data.max_tokens=-1")


# ------------------------------------------------------------------------------------ training runs


def test_packed_training_with_accumulation_and_lora(quick_config):
    cfg = quick_config("packed", "data.packing=true", "data.max_tokens=400", "optim.grad_accum=2")
    result = train(cfg)
    records = read_metrics(result.out, "train")
    assert len(records) == 4 and all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in records)
    assert (result.out / "adapter" / "adapter_model.safetensors").is_file()


def test_token_budget_padded_training(quick_config):
    result = train(quick_config("budget", "data.max_tokens=300", "schedule.max_steps=2"))
    assert all(math.isfinite(r["loss"]) for r in read_metrics(result.out, "train"))


@pytest.mark.slow
def test_packed_ddp_two_processes_match_one_process_with_accumulation(quick_config, tmp_path):
    """Packed micro-batches are cut the same way for any world size: 2 ranks x 1 == 1 rank x 2 accumulated."""
    args = [
        "method=full",
        "schedule.max_steps=3",
        "eval.gen_samples=0",
        "eval.max_samples=2",
        "data.packing=true",
        "data.max_tokens=300",
        "data.group_by_length=false",
    ]
    single = train(quick_config("single", "optim.grad_accum=2", *args))
    cfg = quick_config("ddp", *args)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "phivision.cli", "train", "--out", cfg.out, "--data", cfg.data.path, "--model", cfg.model,
        "tracking.log_every=1", "optim.lr=1e-3", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_metrics(single.out, "train"), read_metrics(tmp_path / "ddp", "train")
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)


# ------------------------------------------------------------------------------------ Liger


def test_liger_on_a_machine_without_cuda_stops_before_the_model_loads(quick_config, monkeypatch):
    import phivision.train.loop as loop

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the Liger check")

    monkeypatch.setattr(loop, "_load_model", must_not_load)
    with pytest.raises(PhivisionError, match=r"use_liger_kernel.*CUDA"):
        train(quick_config("liger", "use_liger_kernel=true"))
    assert "liger_kernel" not in sys.modules


def test_liger_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    from phivision.train.kernels import require_liger

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the package check comes after CUDA's
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a),
    )
    with pytest.raises(PhivisionError, match=r"liger-kernel.*phivision\[liger\]"):
        require_liger(True)
    require_liger(False)  # off: nothing is checked
