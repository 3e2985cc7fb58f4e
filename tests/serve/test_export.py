"""export: merged weights in the official layout, reloadable with identical logits; the adapter stays PEFT-loadable."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from PIL import Image
from safetensors import safe_open
from serve_helpers import RUN_PROMPT, forward_logits, make_lora_run

from phivision.args import MAX_SHARD_SIZE
from phivision.errors import PhivisionError
from phivision.model import Phi3VConfig, Phi3VForCausalLM
from phivision.model.standin import standin_config
from phivision.runs import load_model
from phivision.serve.export import export_run

IMAGE = Image.new("RGB", (70, 100), (30, 160, 90))


def checkpoint_keys(directory: Path) -> set[str]:
    """Tensor names stored in a checkpoint directory (single file or shards)."""
    keys: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


@pytest.fixture(scope="module")
def exported(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(lora_run, tmp_path_factory.mktemp("export") / "merged", max_shard_size="1MB")


def test_the_default_shard_size_gives_the_full_size_model_the_official_two_files(reference_dir: Path) -> None:
    """The 4.2B model in bf16 (8.3 GB), split as ``save_pretrained`` splits it: two files under the default bound
    (like the download's index), three under transformers' old 4GB."""
    assert inspect.signature(export_run).parameters["max_shard_size"].default == MAX_SHARD_SIZE
    with torch.device("meta"):  # shapes and dtypes only: no memory
        model = Phi3VForCausalLM(Phi3VConfig(**standin_config(reference_dir))).to(torch.bfloat16)
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == 4_146_621_440

    def files(bound: str) -> list[str]:
        split = split_torch_state_dict_into_shards(
            state, filename_pattern="model{suffix}.safetensors", max_shard_size=bound
        )
        return sorted(split.filename_to_tensors)

    official = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert files(MAX_SHARD_SIZE) == sorted(set(official.values()))
    assert len(files("4GB")) == 3


def test_export_writes_the_official_layout(exported: Path, tiny_checkpoint: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "phi3_v"
    assert config["architectures"] == ["Phi3VForCausalLM"]

    shards = sorted(exported.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1, "max_shard_size=1MB must split the ~3 MB tiny model"
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    # Exactly the base checkpoint's tensor names: no PEFT prefixes, no lora_A/B, nothing renamed or missing.
    assert set(index["weight_map"]) == checkpoint_keys(exported) == checkpoint_keys(Path(tiny_checkpoint))

    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (exported / name).is_file(), name
    assert (
        json.loads((exported / "preprocessor_config.json").read_text())["processor_class"] == "Phi3VProcessor"
    )
    generation = json.loads((exported / "generation_config.json").read_text())
    processor = load_model(exported, device="cpu").processor
    assert set(generation["eos_token_id"]) == set(processor.stop_token_ids)


def test_export_reloads_with_identical_logits(exported: Path, lora_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoProcessor

    import phivision.model  # noqa: F401  (registers phi3_v with the Auto* classes)

    run = load_model(lora_run, device="cpu", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(exported)
    expected = forward_logits(run.model, run.processor, run.prompt, IMAGE)
    got = forward_logits(model, processor, run.prompt, IMAGE)
    assert (expected - got).abs().max().item() < 1e-5

    reloaded = load_model(exported, device="cpu")
    assert reloaded.prompt == RUN_PROMPT  # the run's prompt travels with the export (phivision.json)


def test_adapter_stays_loadable_with_peft(exported: Path, lora_run: Path, tiny_checkpoint: Path) -> None:
    from peft import PeftModel

    from phivision.model import Phi3VForCausalLM

    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    run = load_model(lora_run, device="cpu", dtype="float32")
    torch.testing.assert_close(
        forward_logits(peft_model, run.processor, run.prompt, IMAGE),
        forward_logits(run.model, run.processor, run.prompt, IMAGE),
        atol=1e-5,
        rtol=1e-5,
    )


def test_full_run_export_matches(full_run: Path, tmp_path: Path) -> None:
    out = export_run(full_run, tmp_path / "full", dtype="float32")
    run = load_model(full_run, device="cpu")
    reloaded = load_model(out, device="cpu")
    diff = forward_logits(run.model, run.processor, run.prompt, IMAGE) - forward_logits(
        reloaded.model, reloaded.processor, reloaded.prompt, IMAGE
    )
    assert diff.abs().max().item() < 1e-5


def test_export_follows_an_official_base(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A bf16 base with the hub's remote code and auto_map: the export is saved in bf16 and ships phivision's own
    model code and auto_map instead (the base's code is never copied)."""
    from phivision.model import AUTO_MAP, MODEL_CODE_FILES

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    config = json.loads((base / "config.json").read_text())
    hub_map = {"AutoConfig": "configuration_phi3_v.Phi3VConfig"}
    (base / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16", "auto_map": hub_map}))
    (base / "processing_phi3_v.py").write_text("# stands in for the hub's processor code\n")
    (base / "image_embedding_phi3_v.py").write_text("# stands in for the hub's embedding code\n")

    out = export_run(make_lora_run(base, tmp_path / "run"), tmp_path / "out")
    assert sorted(p.name for p in out.glob("*.py")) == sorted(MODEL_CODE_FILES)
    assert "stands in" not in (out / "processing_phi3_v.py").read_text()
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    load_model(out, device="cpu")  # phivision's own classes load it


def test_export_refuses_bad_arguments(lora_run: Path, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(PhivisionError, match="already exists"):
        export_run(lora_run, exported)
    with pytest.raises(PhivisionError, match="not a training run"):
        export_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
