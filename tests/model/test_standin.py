"""Stand-in checkpoints: the real files plus random weights, at full size (planned on the meta device) and shrunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from phivision.errors import PhivisionError
from phivision.model.standin import (
    model_tensor_shapes,
    plan_shards,
    random_tensor,
    standin_config,
    stream_safetensors,
    write_standin_checkpoint,
)

SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 192,  # 2 heads of 96: the real head size, so the real LongRoPE factor lists fit as they are
    "intermediate_size": 384,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vision": {"num_hidden_layers": 3},
    "layer_idx": -2,
}


def test_full_size_tensors_are_exactly_the_real_index(reference_dir: Path) -> None:
    shapes = model_tensor_shapes(standin_config(reference_dir))
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())
    assert set(shapes) == set(index["weight_map"])
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 4_146_621_440
    assert 2 * sum(torch.Size(s).numel() for s in shapes.values()) == index["metadata"]["total_size"]
    shards = plan_shards(shapes, index["weight_map"], max_shard_bytes=1, itemsize=2)
    assert {name: len(names) for name, names in shards.items()} == {
        "model-00001-of-00002.safetensors": 507,
        "model-00002-of-00002.safetensors": 85,
    }
    assert shapes["model.embed_tokens.weight"] == (32064, 3072)


def test_a_shrunk_standin_loads_strictly_with_the_real_tokenizer(reference_dir: Path, tmp_path: Path) -> None:
    from phivision.runs import load_model

    out = write_standin_checkpoint(tmp_path / "s", reference_dir, num_crops=2, **SMALL)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 32064 and config["num_hidden_layers"] == 2
    assert config["img_processor"]["vision_config"] == {"num_hidden_layers": 3}
    assert config["img_processor"]["layer_idx"] == -2
    assert len(config["rope_scaling"]["long_factor"]) == 48  # head size 96, as the real model
    assert json.loads((out / "preprocessor_config.json").read_text())["num_crops"] == 2
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "LICENSE"):
        assert (out / name).read_bytes() == (reference_dir / name).read_bytes()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    loaded = load_model(out, device="cpu", dtype="float32")
    assert loaded.model.get_input_embeddings().weight.shape == (32064, 192)
    assert len(loaded.model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers) == 3
    # The real tokenizer: ids beyond it are rows of the embedding that no text maps to.
    assert loaded.processor.tokenizer.convert_tokens_to_ids("<|end|>") == 32007


def test_same_seed_same_bytes_and_tensors_do_not_depend_on_each_other(
    reference_dir: Path, tmp_path: Path
) -> None:
    a = write_standin_checkpoint(tmp_path / "a", reference_dir, seed=3, **SMALL)
    b = write_standin_checkpoint(tmp_path / "b", reference_dir, seed=3, **SMALL)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    deeper = write_standin_checkpoint(
        tmp_path / "c", reference_dir, seed=3, **{**SMALL, "num_hidden_layers": 3}
    )
    first, second = load_file(a / "model.safetensors"), load_file(deeper / "model.safetensors")
    assert torch.equal(
        first["model.layers.1.self_attn.qkv_proj.weight"], second["model.layers.1.self_attn.qkv_proj.weight"]
    )
    other = load_file(
        write_standin_checkpoint(tmp_path / "d", reference_dir, seed=4, **SMALL) / "model.safetensors"
    )
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_norms_are_ones_biases_zeros_and_the_rest_normal() -> None:
    assert torch.equal(random_tensor("model.norm.weight", (8,), torch.float32, 0, 0.02), torch.ones(8))
    assert torch.equal(random_tensor("x.layer_norm1.bias", (8,), torch.float32, 0, 0.02), torch.zeros(8))
    weights = random_tensor("model.embed_tokens.weight", (512, 64), torch.float32, 0, 0.5)
    assert abs(weights.std().item() - 0.5) < 0.02 and abs(weights.mean().item()) < 0.02
    separator = random_tensor("model.vision_embed_tokens.glb_GN", (1, 1, 16), torch.float32, 0, 0.02)
    assert separator.abs().sum() > 0


def test_streamed_file_is_what_safetensors_reads(tmp_path: Path) -> None:
    shapes = {"b": (3,), "a.weight": (5, 7), "c": (2, 3, 4)}
    made = {}

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        made[name] = random_tensor(name, shape, torch.bfloat16, 1, 1.0)
        return made[name]

    stream_safetensors(tmp_path / "x.safetensors", shapes, torch.bfloat16, make)
    read = load_file(tmp_path / "x.safetensors")
    assert set(read) == set(shapes)
    for name, tensor in made.items():
        assert torch.equal(read[name], tensor)


def test_sharded_standin_has_an_index_and_loads(reference_dir: Path, tmp_path: Path) -> None:
    from phivision.runs import load_model

    out = write_standin_checkpoint(tmp_path / "s", reference_dir, max_shard_bytes=4_000_000, **SMALL)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / name).is_file() for name in files)
    assert load_model(out, device="cpu").model.lm_head.weight.shape == (32064, 192)


def test_unknown_override_and_missing_reference_are_one_line_errors(
    tmp_path: Path, reference_dir: Path
) -> None:
    with pytest.raises(PhivisionError, match="unknown config override"):
        standin_config(reference_dir, num_layers=2)
    with pytest.raises(PhivisionError, match="config.json: not found"):
        write_standin_checkpoint(tmp_path / "x", tmp_path)
