"""Phi3VConfig reads the official config.json files as they are and writes them back with their keys; the rope
settings in the form each transformers reads."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from transformers import AutoConfig

import phivision.model  # noqa: F401  (registers phi3_v with the Auto* classes)
from phivision.model import Phi3VConfig
from phivision.model import configuration_phi3_v as configuration

DATA = Path(__file__).parent / "data"
OFFICIAL = ["phi-3-vision-128k-instruct", "phi-3.5-vision-instruct"]
# Metadata that transformers itself rewrites on save: the loading path and the writing library's version.
REWRITTEN = {"_name_or_path", "transformers_version"}
# A request for one run (flash_attention_2), not a setting of the model: not written back.
NOT_WRITTEN = {"_attn_implementation"}


def official(name: str) -> dict:
    return json.loads((DATA / f"{name}.config.json").read_text())


def write_checkpoint_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_config_round_trips(tmp_path, name):
    source = official(name)
    config = AutoConfig.from_pretrained(write_checkpoint_config(tmp_path / "in", source))
    assert type(config) is Phi3VConfig
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in source.items():
        if key not in REWRITTEN | NOT_WRITTEN:
            assert written.get(key) == value, key
    assert "_attn_implementation" not in written
    assert written["rope_scaling"]["type"] == "su"  # as read
    assert written["rope_parameters"] == config.rope_parameters  # and transformers 5's form beside it
    assert written["rope_parameters"]["rope_type"] == "longrope"
    assert "vision_config" not in written["img_processor"]  # the tiny-model override is never invented
    # and what was written reads back to the same configuration
    again = Phi3VConfig.from_pretrained(tmp_path / "out").to_dict()
    assert {k: v for k, v in again.items() if k not in REWRITTEN} == {
        k: v for k, v in config.to_dict().items() if k not in REWRITTEN
    }


@pytest.mark.parametrize("name", OFFICIAL)
def test_language_model_config_translates_su_rope_to_longrope(name):
    source = official(name)
    text = Phi3VConfig.from_dict(source).language_model_config()
    rope = text.rope_parameters
    assert rope["rope_type"] == "longrope"
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["long_factor"] == source["rope_scaling"]["long_factor"]
    assert rope["short_factor"] == source["rope_scaling"]["short_factor"]
    assert text.max_position_embeddings == 131072
    assert text.sliding_window == source["sliding_window"]
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (3072, 32, 32064)
    # cos/sin scaling of the official remote code: sqrt(1 + ln(131072 / 4096) / ln(4096))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](text, "cpu")
    assert attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert attention_factor == pytest.approx(1.190238, abs=1e-6)
    assert inv_freq.shape == (48,)
    assert inv_freq[1].item() == pytest.approx(1 / (rope["short_factor"][1] * 10000 ** (2 / 96)), rel=1e-5)


def test_vision_tower_is_clip_vit_l_14_336_unless_overridden():
    vision = Phi3VConfig.from_dict(official("phi-3-vision-128k-instruct")).vision_tower_config()
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (1024, 4096, 24)
    assert (vision.num_attention_heads, vision.image_size, vision.patch_size) == (16, 336, 14)
    assert vision.hidden_act == "quick_gelu"

    small = {
        "image_size": 56,
        "patch_size": 14,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    config = Phi3VConfig(img_processor={"image_dim_out": 64, "num_img_tokens": 4, "vision_config": small})
    vision = config.vision_tower_config()
    assert (vision.image_size, vision.hidden_size, vision.num_hidden_layers) == (56, 64, 2)
    assert vision.intermediate_size == 4096  # fields not overridden keep the official value


def test_flash_attention_request_falls_back_to_sdpa_said_once_and_not_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(configuration, "is_flash_attn_2_available", lambda: False)
    source = official("phi-3-vision-128k-instruct")
    with caplog.at_level(logging.WARNING, logger=configuration.__name__):
        configs = [
            Phi3VConfig.from_dict(source) for _ in range(3)
        ]  # one load builds its config several times
    assert [c._attn_implementation for c in configs] == ["sdpa"] * 3
    assert (
        caplog.text.count("flash-attn is not installed") <= 1
    )  # once per process (0: said by an earlier test)
    config = configs[0]
    assert config.language_model_config()._attn_implementation == "sdpa"
    assert config.vision_tower_config()._attn_implementation == "sdpa"
    config.save_pretrained(tmp_path)
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())

    # an explicit choice wins over the file's
    chosen = Phi3VConfig.from_pretrained(
        write_checkpoint_config(tmp_path / "ckpt", source), attn_implementation="eager"
    )
    assert chosen._attn_implementation == "eager"


def test_flash_attention_is_kept_when_installed(monkeypatch):
    monkeypatch.setattr(configuration, "is_flash_attn_2_available", lambda: True)
    assert Phi3VConfig(_attn_implementation="flash_attention_2")._attn_implementation == "flash_attention_2"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"embd_layer": {"hd_transform_order": "glb_sub"}}, "hd_transform_order"),
        ({"img_processor": {"image_dim_out": 512}}, "image_dim_out 512"),
        ({"hidden_size": 100, "num_attention_heads": 3}, "multiple of num_attention_heads"),
        ({"img_processor": {"image_dim_out": 1024, "type_feature": "cls_patch"}}, "type_feature"),
    ],
)
def test_unsupported_settings_fail_early(fields, message):
    with pytest.raises(ValueError, match=message):
        Phi3VConfig(**fields)


def test_unknown_rope_type_is_rejected_when_the_config_is_read():
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        Phi3VConfig(rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        Phi3VConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("name", OFFICIAL)
def test_rope_parameters_expose_the_official_longrope(name):
    """transformers 5 and vLLM read `rope_parameters`: the official "su" rope_scaling appears there as LongRoPE
    (a config without it makes every such reader run plain RoPE)."""
    source = official(name)
    config = Phi3VConfig.from_dict(source)
    assert config.rope_parameters == {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "long_factor": source["rope_scaling"]["long_factor"],
        "short_factor": source["rope_scaling"]["short_factor"],
        "original_max_position_embeddings": 4096,
        "factor": 32.0,
    }
    assert config.rope_scaling == config.rope_parameters  # transformers 5's alias, read without a warning
    # transformers' own validation, as vLLM runs it, accepts them without a word
    config.standardize_rope_params()
    config.validate_rope()
    assert config.rope_parameters["rope_type"] == "longrope"


def test_either_rope_key_reads_the_same_and_a_contradiction_is_refused(tmp_path):
    source = official("phi-3-vision-128k-instruct")
    from_legacy = Phi3VConfig.from_dict(source)
    only_new = {k: v for k, v in source.items() if k != "rope_scaling"}
    only_new["rope_parameters"] = from_legacy.rope_parameters
    from_new = Phi3VConfig.from_dict(only_new)
    assert from_new.rope_parameters == from_legacy.rope_parameters
    assert (
        from_new.language_model_config().rope_parameters
        == from_legacy.language_model_config().rope_parameters
    )
    # A file with only rope_parameters gets rope_scaling in the form transformers 4.4x reads.
    from_new.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] == {
        "type": "longrope",
        "long_factor": source["rope_scaling"]["long_factor"],
        "short_factor": source["rope_scaling"]["short_factor"],
    }

    both = {**source, "rope_parameters": {**from_legacy.rope_parameters, "short_factor": [1.0] * 48}}
    with pytest.raises(ValueError, match="describe different ropes"):
        Phi3VConfig.from_dict(both)


def test_plain_rope_config_has_default_rope_parameters():
    config = Phi3VConfig(rope_theta=500.0)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert config.language_model_config().rope_parameters["rope_type"] == "default"
    assert config.to_dict()["rope_scaling"] is None
