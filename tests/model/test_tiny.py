"""Tiny checkpoints: written in the official layout, loaded back through the same Auto* path as real ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # not torchvision-gated in 5.17
from typer.testing import CliRunner

import phivision.model  # noqa: F401  (registers phi3_v with the Auto* classes)
from phivision.answer.prompt import prompt_text
from phivision.cli import app
from phivision.errors import PhivisionError
from phivision.model import (
    AUTO_MAP,
    MODEL_CODE_FILES,
    Phi3VConfig,
    Phi3VForCausalLM,
    Phi3VImageProcessor,
    Phi3VProcessor,
)
from phivision.tiny import write_tiny_checkpoint

DATA = Path(__file__).parent / "data"


def images() -> list[Image.Image]:
    """Two images of different shapes, so they get different crop grids."""
    wide = Image.new("RGB", (120, 50), (200, 30, 30))
    tall = Image.new("RGB", (40, 90), (20, 160, 90))
    return [wide, tall]


def test_tiny_checkpoint_has_the_official_layout(tiny_checkpoint):
    files = {p.name for p in Path(tiny_checkpoint).iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= files
    assert set(MODEL_CODE_FILES) <= files  # phivision's own model code, as the official files carry theirs
    written = json.loads((tiny_checkpoint / "config.json").read_text())
    official = json.loads((DATA / "phi-3-vision-128k-instruct.config.json").read_text())
    # same fields as the real file (minus the FA2 request, plus the dropouts/pad id); auto_map names our code
    assert set(official) - {"_attn_implementation", "_name_or_path"} <= set(written)
    assert written["auto_map"] == AUTO_MAP
    assert written["model_type"] == "phi3_v"
    assert written["rope_scaling"]["type"] == "su"
    half_head = written["hidden_size"] // written["num_attention_heads"] // 2
    assert (
        len(written["rope_scaling"]["long_factor"])
        == len(written["rope_scaling"]["short_factor"])
        == half_head
    )
    assert written["original_max_position_embeddings"] < written["max_position_embeddings"]
    assert written["img_processor"]["vision_config"]["image_size"] == 56

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    tokenizer = processor.tokenizer
    assert written["vocab_size"] == len(tokenizer)
    assert written["bos_token_id"] == tokenizer.bos_token_id
    assert written["eos_token_id"] == tokenizer.eos_token_id
    assert written["pad_token_id"] == tokenizer.pad_token_id
    assert processor.image_processor.num_crops == 4
    assert processor.image_processor.crop_size == 56
    assert processor.image_processor.num_img_tokens == written["img_processor"]["num_img_tokens"]


def test_tiny_weights_are_deterministic_by_seed(tmp_path, tiny_checkpoint):
    again = load_file(write_tiny_checkpoint(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(write_tiny_checkpoint(tmp_path / "other", seed=1) / "model.safetensors")
    first = load_file(tiny_checkpoint / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_processor_batch_runs_through_loaded_model_and_reloads_bit_identically(tmp_path, tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert isinstance(model, Phi3VForCausalLM) and isinstance(processor, Phi3VProcessor)
    texts = [prompt_text(), "<|user|>\nNo image here.<|end|>\n<|assistant|>\n", prompt_text()]
    inputs = processor(text=texts, images=images())
    assert inputs["pixel_values"].shape == (2, 5, 3, 56, 56)
    with torch.no_grad():
        logits = model(**inputs).logits

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    reinputs = AutoProcessor.from_pretrained(tmp_path / "saved")(text=texts, images=images())
    assert all(torch.equal(inputs[k], reinputs[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(reloaded(**reinputs).logits, logits)


def test_training_examples_from_the_processor_give_a_loss(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    wide, tall = images()
    examples = [
        processor.build_example(
            prompt_text(), "Product: Red Scarf, Category: Scarves, Full Price: 120.0", [wide]
        ),
        processor.build_example(
            prompt_text(), "Product: Green Boot, Category: Shoes, Full Price: 89.5", [tall]
        ),
    ]
    loss = model(**processor.collate(examples)).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.model.vision_embed_tokens.img_projection[0].weight.grad is not None


def official_style_copy(tiny_checkpoint: Path, destination: Path) -> Path:
    """The tiny checkpoint with the hub files' auto_map entries (pointing at remote code) added."""
    shutil.copytree(tiny_checkpoint, destination)
    config = json.loads((destination / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    }
    (destination / "config.json").write_text(json.dumps(config))
    preprocessor = json.loads((destination / "preprocessor_config.json").read_text())
    preprocessor["image_processor_type"] = "Phi3VImageProcessor"
    preprocessor["processor_class"] = "Phi3VProcessor"
    preprocessor["auto_map"] = {
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
    }
    (destination / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return destination


@pytest.mark.parametrize("trust", [{}, {"trust_remote_code": False}], ids=["unset", "false"])
def test_auto_classes_resolve_to_phivision_despite_auto_map(tmp_path, tiny_checkpoint, trust):
    path = official_style_copy(tiny_checkpoint, tmp_path / "ckpt")
    assert type(AutoConfig.from_pretrained(path, **trust)) is Phi3VConfig
    assert type(AutoModelForCausalLM.from_pretrained(path, **trust)) is Phi3VForCausalLM
    assert type(AutoImageProcessor.from_pretrained(path, **trust)) is Phi3VImageProcessor
    assert type(AutoProcessor.from_pretrained(path, **trust)) is Phi3VProcessor
    # the file's auto_map is kept for the hub code, and written back
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "resaved")
    assert "auto_map" in json.loads((tmp_path / "resaved" / "config.json").read_text())


def test_from_config_on_meta_device(tiny_checkpoint):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model) is Phi3VForCausalLM
    assert all(p.is_meta for p in model.parameters())


def test_corpus_and_overrides(tmp_path):
    word = "Zyxwvubrand"
    path = write_tiny_checkpoint(
        tmp_path / "ckpt", corpus=[word] * 50, num_crops=2, hidden_size=64, vision={"hidden_size": 32}
    )
    processor = AutoProcessor.from_pretrained(path)
    assert len(processor.tokenizer.tokenize(word)) <= 2  # learnt from the corpus
    assert processor.image_processor.num_crops == 2
    config = AutoConfig.from_pretrained(path)
    assert config.hidden_size == 64 and config.vision_tower_config().hidden_size == 32
    assert len(config.rope_scaling["long_factor"]) == 64 // 4 // 2


def test_bad_requests_raise_and_write_nothing(tmp_path):
    with pytest.raises(PhivisionError, match="unknown config override"):
        write_tiny_checkpoint(tmp_path / "ckpt", hidden_sise=64)
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(PhivisionError, match="not an empty directory"):
        write_tiny_checkpoint(tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_cli_tiny_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(app, ["tiny", "--out", str(out), "--seed", "3", "--num-crops", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote tiny checkpoint" in result.output
    assert type(AutoModelForCausalLM.from_pretrained(out)) is Phi3VForCausalLM
    assert AutoProcessor.from_pretrained(out).image_processor.num_crops == 2
    # a second run must not overwrite it: a one-line PhivisionError (the CLI's main() prints it, exit code 2)
    again = CliRunner().invoke(app, ["tiny", "--out", str(out)])
    assert isinstance(again.exception, PhivisionError)
