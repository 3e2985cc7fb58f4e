"""Phi3VConfig reads the official config.json files as they are and writes them back the same."""

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
        if key not in REWRITTEN:
            assert written.get(key) == value, key
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


def test_flash_attention_request_falls_back_to_sdpa_and_is_written_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(configuration, "is_flash_attn_2_available", lambda: False)
    source = official("phi-3-vision-128k-instruct")
    with caplog.at_level(logging.WARNING, logger=configuration.__name__):
        config = Phi3VConfig.from_dict(source)
    assert config._attn_implementation == "sdpa"
    assert "flash-attn is not installed" in caplog.text
    assert config.language_model_config()._attn_implementation == "sdpa"
    assert config.vision_tower_config()._attn_implementation == "sdpa"
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_attn_implementation"] == "flash_attention_2"

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


def test_unknown_rope_type_is_rejected_when_building_the_language_model():
    config = Phi3VConfig(rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        config.language_model_config()
