"""load_model: RUN with a LoRA adapter, RUN with a full model, plain checkpoint, bad paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from serve_helpers import RUN_PROMPT, forward_logits, make_lora_run, write_config

from phivision.answer.prompt import PromptFormat
from phivision.errors import PhivisionError
from phivision.model import Phi3VForCausalLM
from phivision.runs import load_model, read_run

IMAGE = Image.new("RGB", (90, 60), (120, 30, 200))


def test_lora_run_merges_adapter(lora_run: Path, tiny_checkpoint: Path) -> None:
    merged = load_model(lora_run, device="cpu")
    unmerged = load_model(lora_run, device="cpu", merge=False)
    base = load_model(tiny_checkpoint, device="cpu")

    assert isinstance(merged.model, Phi3VForCausalLM)  # merged: a plain model again, no PEFT wrapper
    assert type(unmerged.model).__name__ == "PeftModel"
    assert merged.prompt == RUN_PROMPT
    assert merged.model.dtype == torch.float32 and not merged.model.training
    assert str(lora_run) in merged.source and "lora" in merged.source

    logits = forward_logits(merged.model, merged.processor, merged.prompt, IMAGE)
    torch.testing.assert_close(
        logits,
        forward_logits(unmerged.model, unmerged.processor, unmerged.prompt, IMAGE),
        atol=1e-5,
        rtol=1e-5,
    )
    # The adapter really changed the model.
    assert (logits - forward_logits(base.model, base.processor, merged.prompt, IMAGE)).abs().max() > 1e-3


def test_full_run_loads_saved_model(full_run: Path, tiny_checkpoint: Path) -> None:
    loaded = load_model(full_run, device="cpu")
    reference = Phi3VForCausalLM.from_pretrained(full_run / "model", dtype=torch.float32)
    assert loaded.prompt == RUN_PROMPT
    assert "full" in loaded.source
    for name, param in reference.state_dict().items():
        assert torch.equal(param, loaded.model.state_dict()[name]), name


def test_plain_checkpoint_uses_default_prompt(tiny_checkpoint: Path) -> None:
    loaded = load_model(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert isinstance(loaded.model, Phi3VForCausalLM)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.prompt == PromptFormat()
    assert loaded.processor.stop_token_ids


def test_relative_base_resolves_beside_the_run(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(tiny_checkpoint, tmp_path / "bases" / "tiny")
    run = make_lora_run(
        tmp_path / "bases" / "tiny", tmp_path / "runs" / "run", model_field="../../bases/tiny"
    )
    monkeypatch.chdir(
        tmp_path / "runs"
    )  # ../../bases/tiny does not exist from here: resolved from the RUN dir
    assert read_run(run).base == str((tmp_path / "bases" / "tiny").resolve())
    assert isinstance(load_model(run, device="cpu").model, Phi3VForCausalLM)


def test_bad_paths_raise_phivision_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhivisionError, match="neither a training run"):
        load_model(tmp_path / "empty", device="cpu")
    with pytest.raises(PhivisionError, match="no such directory"):
        load_model(tmp_path / "missing", device="cpu")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(PhivisionError, match="neither"):
        load_model(tmp_path / "file.txt", device="cpu")
    # A hub id is passed to from_pretrained; offline (as in tests) that fails with a one-line PhivisionError.
    with pytest.raises(PhivisionError, match="cannot load checkpoint 'someorg/no-such-model'") as info:
        load_model("someorg/no-such-model", device="cpu")
    assert "\n" not in str(info.value)


def test_run_config_errors_name_the_field(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\n")
    with pytest.raises(PhivisionError, match="config.yaml: field 'model'"):
        load_model(run, device="cpu")
    write_config(run, str(tmp_path / "no-such-base"), "lora")
    with pytest.raises(PhivisionError, match="cannot load checkpoint"):
        load_model(run, device="cpu")
    (run / "config.yaml").write_text("model: x\nmethod: dpo\n")
    with pytest.raises(PhivisionError, match="field 'method'"):
        load_model(run, device="cpu")
    with pytest.raises(PhivisionError, match="--dtype"):
        load_model(run, device="cpu", dtype="int3")
