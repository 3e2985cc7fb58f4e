"""The training loop on the tiny model: methods, artifacts, evaluation, best weights, early stopping."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from phivision.errors import PhivisionError
from phivision.train import train
from phivision.train.tracking import read_metrics

GENERATION_METRICS = ("parse_rate", "category_accuracy", "price_mape")


def test_lora_run_writes_the_run_layout(quick_config):
    cfg = quick_config(
        "lora", "schedule.max_steps=6", "eval.every_steps=3", "checkpoint.every_steps=2", "optim.lr=5e-3"
    )
    result = train(cfg)
    run = result.out
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "model").exists()
    assert (run / "processor" / "preprocessor_config.json").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == cfg.model and saved["method"] == "lora"
    assert set(saved["prompt"]) == {"question", "answer_template"}
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-4", "step-6"]  # keep_last=2

    losses = [r["loss"] for r in read_metrics(run, "train")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert {"val_loss", *GENERATION_METRICS} <= set(e)
    assert result.steps == 6 and result.metrics["val_loss"] == evals[-1]["val_loss"]

    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(".lora_" in k for k in trained)  # LoRA only: the base stays frozen
    assert any("qkv_proj" in k for k in trained) and not any("vision_embed_tokens" in k for k in trained)


def test_full_fine_tuning_saves_a_loadable_model(quick_config, tiny_checkpoint):
    from phivision.model.modeling_phi3_v import Phi3VForCausalLM

    cfg = quick_config("full", "method=full", "schedule.max_steps=2", "gradient_checkpointing=true")
    result = train(cfg)
    tuned = Phi3VForCausalLM.from_pretrained(result.out / "model")
    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    assert set(tuned_sd) == set(base_sd)
    assert not torch.equal(
        tuned_sd["model.layers.0.self_attn.qkv_proj.weight"],
        base_sd["model.layers.0.self_attn.qkv_proj.weight"],
    )
    assert not torch.equal(
        tuned_sd["model.vision_embed_tokens.img_projection.0.weight"],
        base_sd["model.vision_embed_tokens.img_projection.0.weight"],
    )
    # CLIP's last layer feeds nothing (spec pitfall 5): frozen, so DDP never waits for its gradient
    last = [k for k in base_sd if ".encoder.layers.1." in k and "vision_model" in k]
    assert last and all(torch.equal(tuned_sd[k], base_sd[k]) for k in last)


def test_freeze_flags_keep_vision_and_projector(quick_config, tiny_checkpoint):
    from phivision.model.modeling_phi3_v import Phi3VForCausalLM

    cfg = quick_config(
        "frozen", "method=full", "schedule.max_steps=1", "freeze.vision=true", "freeze.projector=true"
    )
    tuned = Phi3VForCausalLM.from_pretrained(train(cfg).out / "model").state_dict()
    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    vision = [k for k in base if "vision_embed_tokens" in k]
    assert all(torch.equal(tuned[k], base[k]) for k in vision)
    # the embedding is shared with the vision module in the official code; freezing vision must not freeze it
    assert not torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_lora_on_vision_and_projector_targets_the_right_modules(quick_config):
    cfg = quick_config(
        "vision", "schedule.max_steps=1", "lora.vision=true", "lora.projector=true", "lora.modules_to_save=[]"
    )
    keys = load_file(train(cfg).out / "adapter" / "adapter_model.safetensors").keys()
    clip = [k for k in keys if "img_processor" in k]
    assert any("self_attn.q_proj" in k for k in clip) and any("mlp.fc2" in k for k in clip)
    assert not any(".encoder.layers.1." in k for k in clip)  # the unused last CLIP layer gets no adapter
    assert any("img_projection.0" in k for k in keys) and any("img_projection.2" in k for k in keys)
    assert any("layers.0.self_attn.qkv_proj" in k for k in keys)


def test_gradient_accumulation_matches_a_bigger_batch(quick_config):
    common = ("data.group_by_length=false", "schedule.max_steps=3", "optim.grad_clip=0")
    big = train(quick_config("big", "data.batch_size=4", *common)).out
    accum = train(quick_config("accum", "data.batch_size=2", "optim.grad_accum=2", *common)).out
    a = [r["loss"] for r in read_metrics(big, "train")]
    b = [r["loss"] for r in read_metrics(accum, "train")]
    assert a == pytest.approx(b, rel=1e-4)


def test_early_stopping_keeps_the_best_weights(quick_config):
    cfg = quick_config(
        "early",
        "schedule.max_steps=20",
        "eval.every_steps=1",
        "eval.patience=2",
        "eval.metric=parse_rate",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=5",
    )
    result = train(cfg)
    # an untrained tiny model never writes a parseable answer in 3 steps: parse_rate stays 0, best is step 1
    assert result.stopped_early and result.steps == 3 and result.best_step == 1
    best = load_file(result.out / "adapter" / "adapter_model.safetensors")
    first = load_file(result.out / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors")
    last = load_file(result.out / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], first[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_bf16_autocast_and_eager_attention_on_cpu(quick_config):
    result = train(
        quick_config("bf16", "precision=bf16", "attn_implementation=eager", "schedule.max_steps=2")
    )
    assert all(math.isfinite(r["loss"]) for r in read_metrics(result.out, "train"))


def test_qlora_on_cpu_is_a_clear_error(quick_config):
    with pytest.raises(PhivisionError, match="qlora.*CUDA"):
        train(quick_config("qlora", "method=qlora"))


def test_a_finished_run_is_not_overwritten(quick_config):
    cfg = quick_config("twice", "schedule.max_steps=1")
    train(cfg)
    with pytest.raises(PhivisionError, match="already holds a training run"):
        train(cfg)


def test_logged_learning_rate_is_the_rate_each_step_ran_at(quick_config):
    """Warmup over 2 steps from lr/3: step 1 ran at lr/3, step 2 at 2lr/3, step 3 at lr (constant after)."""
    from phivision.train.loop import lr_factor

    cfg = quick_config(
        "lr",
        "schedule.max_steps=3",
        "schedule.warmup_steps=2",
        "schedule.decay=constant",
        "eval.gen_samples=0",
        "eval.max_samples=1",
    )
    records = read_metrics(train(cfg).out, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    ran = [1e-3 * lr_factor(step - 1, 3, 2, "constant", 0.0) for step in (1, 2, 3)]
    assert [r["lr"] for r in records] == pytest.approx(ran)
    assert records[0]["lr"] == pytest.approx(1e-3 / 3)


@pytest.mark.filterwarnings("error::FutureWarning")
def test_activation_checkpointing_and_lora_raise_no_deprecation_warning(quick_config):
    """transformers 5.25 deprecates gradient_checkpointing_enable (and the property PEFT reads): neither warns."""
    cfg = quick_config(
        "gc",
        "gradient_checkpointing=true",
        "schedule.max_steps=1",
        "eval.gen_samples=0",
        "eval.max_samples=1",
    )
    assert read_metrics(train(cfg).out, "train")


def test_precision_auto_follows_the_checkpoint_dtype_where_native(quick_config, reference_dir, tmp_path):
    """A bf16 checkpoint (a shrunk stand-in of the official one) trains in bf16 where the CPU computes bf16
    natively, else in fp32; the tiny float32 checkpoint in fp32. config.yaml records the precision that ran."""
    from phivision.model.standin import SMALL, write_standin_checkpoint
    from phivision.runs import native_half_dtypes

    assert quick_config().precision == "auto"
    standin = write_standin_checkpoint(tmp_path / "standin", reference_dir, num_crops=1, **SMALL)
    native = torch.bfloat16 in native_half_dtypes(torch.device("cpu"))
    for model, expected in ((str(standin), "bf16" if native else "fp32"), (None, "fp32")):
        cfg = quick_config(f"auto-{expected}-{model is None}", "schedule.max_steps=1", "eval.gen_samples=0")
        cfg.model = model or cfg.model
        run = train(cfg).out
        assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == expected
