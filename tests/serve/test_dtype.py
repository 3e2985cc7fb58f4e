"""The default dtype (the checkpoint's, where the device computes it natively) and merges that keep the update.

The bf16 checkpoints here are shrunk stand-ins of the real one (real tokenizer, vocabulary and CLIP width, random
bf16 weights, a few layers): what ``phivision.model.standin`` writes at full size, small enough for the suite.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from serve_helpers import make_lora_run

from phivision.loading import MERGE_TOLERANCE
from phivision.model.standin import SMALL
from phivision.runs import checkpoint_dtype, default_dtype, load_model, native_half_dtypes, resolve_dtype
from phivision.serve.export import export_run

IMAGE = Image.new("RGB", (120, 80), (30, 160, 90))
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CPU_BF16 = BF16 in native_half_dtypes(torch.device("cpu"))


@pytest.fixture(scope="module")
def standin(reference_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from phivision.model.standin import write_standin_checkpoint

    return write_standin_checkpoint(
        tmp_path_factory.mktemp("standin") / "ckpt", reference_dir, num_crops=1, **SMALL
    )


@pytest.fixture(scope="module")
def trained_run(standin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run whose update is large next to the weights (random A and B, as after a long run)."""
    return make_lora_run(standin, tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="module")
def short_run(standin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run whose update is tiny next to the weights, as after a few steps: B scaled by 1e-4."""
    run = make_lora_run(standin, tmp_path_factory.mktemp("short") / "run")
    path = run / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import save_file

    tensors = {k: v * 1e-4 if "lora_B" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return run


def logits(loaded) -> torch.Tensor:
    from phivision.answer.prompt import prompt_text

    batch = loaded.processor(text=prompt_text(loaded.prompt), images=[IMAGE], return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(loaded.model.dtype)
    with torch.no_grad():
        return loaded.model(**batch).logits.float()


def test_the_policy_keeps_the_checkpoint_dtype_only_where_the_device_computes_it() -> None:
    assert default_dtype(BF16, {BF16}) == BF16  # a CPU with AVX512-BF16 or AMX
    assert default_dtype(BF16, set()) == FP32  # a CPU that would emulate bf16: float32 is faster there
    assert default_dtype(FP16, {BF16}) == FP32
    assert default_dtype(FP32, {BF16, FP16}) == FP32  # never below the stored precision
    assert default_dtype(BF16, {FP16}, "cuda") == FP16  # a GPU without bf16
    assert default_dtype(BF16, {BF16, FP16}, "cuda") == BF16
    assert resolve_dtype("fp32", torch.device("cpu"), BF16) == FP32  # a given dtype is used as given
    assert resolve_dtype(None, torch.device("cpu"), BF16) == (BF16 if CPU_BF16 else FP32)


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file(), reason="reads x86 Linux CPU flags"
)
def test_native_bf16_is_what_the_cpu_flags_say() -> None:
    """torch's capability checks against the kernel's own list of CPU features."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert bool(flags & {"avx512_bf16", "amx_bf16"}) == CPU_BF16
    assert (FP16 in native_half_dtypes(torch.device("cpu"))) == ("amx_fp16" in flags)


def test_checkpoint_dtype_reads_both_spellings(tmp_path: Path, standin: Path, tiny_checkpoint: Path) -> None:
    assert checkpoint_dtype(standin) == BF16  # the real config.json's "torch_dtype": "bfloat16"
    assert checkpoint_dtype(tiny_checkpoint) == FP32
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))
    assert checkpoint_dtype(tmp_path) == FP16
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_dtype(tmp_path) == FP32


def test_load_model_uses_the_checkpoint_dtype_where_native(standin: Path, tiny_checkpoint: Path) -> None:
    assert load_model(standin, device="cpu").model.dtype == (BF16 if CPU_BF16 else FP32)
    assert load_model(standin, device="cpu", dtype="float32").model.dtype == FP32
    assert load_model(tiny_checkpoint, device="cpu").model.dtype == FP32


def test_a_bf16_export_is_the_float32_merge_rounded_once(
    trained_run: Path, standin: Path, tmp_path: Path
) -> None:
    weights = (standin / "model.safetensors").read_bytes()
    bf16 = export_run(trained_run, tmp_path / "bf16")  # default: the base's dtype
    assert (
        standin / "model.safetensors"
    ).read_bytes() == weights  # merged in place, never into the base file
    fp32 = export_run(trained_run, tmp_path / "fp32", dtype="float32")
    got, exact = load_file(bf16 / "model.safetensors"), load_file(fp32 / "model.safetensors")
    base = load_file(standin / "model.safetensors")
    assert set(got) == set(exact) == set(base)
    changed = 0
    for name, tensor in got.items():
        assert tensor.dtype == BF16, name
        assert torch.equal(tensor, exact[name].to(BF16)), name  # bit for bit
        changed += not torch.equal(tensor, base[name])
    assert changed == 2 * 4  # 2 layers x qkv, o, gate_up, down

    merge = json.loads((bf16 / "phivision.json").read_text())["merge"]
    assert merge["dtype"] == "bfloat16" and merge["tensors"] == 8
    update = {k: exact[k] - base[k].float() for k in exact if not torch.equal(got[k], base[k])}
    error = sum((got[k].float() - base[k].float() - d).square().sum() for k, d in update.items()).sqrt()
    norm = sum(d.square().sum() for d in update.values()).sqrt()
    assert merge["update_relative_error"] == pytest.approx(float(error / norm), rel=1e-3)
    assert merge["update_relative_error"] < MERGE_TOLERANCE  # a large update survives bf16
    assert json.loads((fp32 / "phivision.json").read_text())["merge"]["update_relative_error"] < 1e-6


def test_a_short_runs_update_lost_in_bf16_is_reported(short_run: Path, tmp_path: Path, capsys) -> None:
    bf16 = export_run(short_run, tmp_path / "bf16")
    error = json.loads((bf16 / "phivision.json").read_text())["merge"]["update_relative_error"]
    assert error > 0.5  # most of a 1e-4-scale update rounds away in 8 significant bits
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings  # (transformers' progress bars share stderr)
    assert warnings[0].startswith(
        "warning: rounding the merged weights to bfloat16 lost part of the LoRA update"
    )
    assert f"relative error {error:.2g} over 8 tensors" in warnings[0] and "--dtype float32" in warnings[0]
    fp32 = export_run(short_run, tmp_path / "fp32", dtype="float32")
    assert json.loads((fp32 / "phivision.json").read_text())["merge"]["update_relative_error"] < 1e-3
    assert "warning:" not in capsys.readouterr().err


def test_loading_a_short_run_in_bf16_says_what_the_merge_lost(short_run: Path, trained_run: Path) -> None:
    short = load_model(short_run, device="cpu", dtype="bfloat16")
    assert type(short.model).__name__ == "Phi3VForCausalLM" and short.model.dtype == BF16
    assert len(short.notes) == 1 and "lost part of the LoRA update" in short.notes[0]
    assert "--dtype float32 keeps it" in short.notes[0]
    assert load_model(short_run, device="cpu", dtype="float32").notes == ()
    assert load_model(trained_run, device="cpu", dtype="bfloat16").notes == ()
    unmerged = load_model(short_run, device="cpu", dtype="bfloat16", merge=False)
    lora = [p for n, p in unmerged.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == FP32 for p in lora)  # the adapter as trained, beside bf16 base weights
