"""Phi-3-Vision configuration: reads the official ``config.json`` unchanged and writes it back with its keys.

The official file is a Phi-3 language-model config plus two Phi-3-V blocks (``embd_layer``, ``img_processor``).
The CLIP tower is not described in the file (the remote code hard-codes ViT-L/14-336), so it is hard-coded here
too; tiny test models override it with an optional ``img_processor["vision_config"]`` dict, which official files
do not have and which is not written when absent.

RoPE: the official file says ``rope_scaling: {"type": "su", ...}`` (LongRoPE under its old name); transformers 5
and the readers built on it (vLLM) read ``rope_parameters`` instead, transformers 4.x reads ``rope_scaling``. The
config takes either key, exposes the form the installed transformers reads, and writes both.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import transformers
from transformers import CLIPVisionConfig, Phi3Config, PretrainedConfig
from transformers.utils import is_flash_attn_2_available

logger = logging.getLogger(__name__)

# This file also ships inside exports, where transformers 4.4x may load it: its Phi3Config takes the rope settings
# as `rope_scaling` ({"type": "longrope", ...}) instead of 5.x's `rope_parameters`.
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

# The CLIP ViT-L/14-336 tower of both official checkpoints (not in config.json; hard-coded by the remote code).
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


def _resolve_attn_implementation(requested: str | None) -> str | None:
    """The official config.json asks for flash_attention_2; without flash-attn use SDPA instead of failing.

    Said once per process: one model load builds its config several times."""
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        logger.warning_once(  # transformers adds warning_once to every logging.Logger (4.4x and 5.x)
            "config asks for flash_attention_2 but flash-attn is not installed: using sdpa instead"
        )
        return "sdpa"
    return requested


# LongRoPE's names: "su" in the official config.json, "longrope" in transformers and vLLM.
_LONGROPE_NAMES = ("su", "longrope")


def standard_rope_parameters(
    rope_scaling: dict[str, Any] | None,
    rope_parameters: dict[str, Any] | None,
    rope_theta: float,
    original_max_position_embeddings: int,
    max_position_embeddings: int,
) -> dict[str, Any]:
    """The rope settings as transformers 5 reads them (``rope_parameters``), from either form of the file.

    ``rope_scaling`` is the official/4.x form (``{"type": "su" | "longrope", "long_factor", "short_factor"}``),
    ``rope_parameters`` the 5.x form; when both are given they must describe the same rope.
    """
    standard = _standard_rope(
        rope_parameters, rope_theta, original_max_position_embeddings, max_position_embeddings
    )
    if rope_scaling is not None:
        theta = standard["rope_theta"] if rope_parameters is not None else rope_theta
        legacy = _standard_rope(
            rope_scaling, theta, original_max_position_embeddings, max_position_embeddings
        )
        if rope_parameters is not None and legacy != standard:
            raise ValueError(
                f"rope_scaling {rope_scaling} and rope_parameters {rope_parameters} describe different ropes"
            )
        standard = legacy
    return standard


def _standard_rope(
    rope: dict[str, Any] | None, rope_theta: float, original_max: int, max_positions: int
) -> dict[str, Any]:
    rope = rope or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", rope_theta))
    if kind == "default":
        return {"rope_type": "default", "rope_theta": theta}
    if kind not in _LONGROPE_NAMES:
        raise ValueError(f"rope type {kind!r} is not supported (only 'su'/'longrope' or none)")
    return {
        "rope_type": "longrope",
        "rope_theta": theta,
        "long_factor": [float(f) for f in rope["long_factor"]],
        "short_factor": [float(f) for f in rope["short_factor"]],
        "original_max_position_embeddings": original_max,
        # What transformers would derive (max / original); given so that it does not warn about deriving it.
        "factor": max_positions / original_max,
    }


def legacy_rope_scaling(rope_parameters: dict[str, Any]) -> dict[str, Any] | None:
    """``rope_scaling`` as transformers 4.4x's Phi3Config reads it (None for plain RoPE)."""
    if rope_parameters["rope_type"] == "default":
        return None
    factors = {key: list(rope_parameters[key]) for key in ("long_factor", "short_factor")}
    return {"type": "longrope", **factors}


class Phi3VConfig(PretrainedConfig):
    """Configuration of Phi-3-Vision-128K-Instruct / Phi-3.5-Vision-Instruct (``model_type: phi3_v``).

    Attribute names are the keys of the official ``config.json``. The rope settings are exposed in the form the
    installed transformers reads: ``rope_parameters`` (``{"rope_type": "longrope", ...}``) on 5.x, where
    ``rope_scaling`` is its read-only alias; ``rope_scaling`` (``{"type": "longrope", ...}``) on 4.x. ``config.json``
    gets both: ``rope_scaling`` as it was read (the official ``"su"`` form) and ``rope_parameters``.
    """

    model_type = "phi3_v"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32064,
        hidden_size: int = 3072,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        resid_pdrop: float = 0.0,
        embd_pdrop: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        original_max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 32000,
        pad_token_id: int | None = 32000,
        sliding_window: int | None = None,
        embd_layer: dict[str, Any] | None = None,
        img_processor: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attention_dropout = attention_dropout
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings = original_max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        rope = standard_rope_parameters(
            rope_scaling,
            rope_parameters,
            rope_theta,
            original_max_position_embeddings,
            max_position_embeddings,
        )
        self.rope_theta = rope["rope_theta"]
        # Written back as read (the official "su" form); derived from rope_parameters when the file had none.
        self._rope_scaling_in_file = copy.deepcopy(rope_scaling) if rope_scaling is not None else None
        if TRANSFORMERS_4:
            self.rope_scaling = legacy_rope_scaling(rope)
        else:
            self.rope_parameters = rope  # 5.x's PretrainedConfig.rope_scaling reads it back
        self.sliding_window = sliding_window
        self.embd_layer = copy.deepcopy(embd_layer if embd_layer is not None else DEFAULT_EMBD_LAYER)
        self.img_processor = copy.deepcopy(
            img_processor if img_processor is not None else DEFAULT_IMG_PROCESSOR
        )

        # The file's `_attn_implementation` (flash_attention_2 in the official files) is a request for this run, not
        # a setting of the model: it is not written back (a checkpoint phivision writes lets each reader choose).
        # An explicit `attn_implementation=` argument wins over it.
        in_file = kwargs.pop("_attn_implementation", None)  # popped always: 5.17 would set it after us
        requested = kwargs.pop("attn_implementation", None) or in_file
        super().__init__(attn_implementation=_resolve_attn_implementation(requested), **kwargs)
        # Set after the base class, whose 4.x version resets them to its own defaults (tied embeddings, no ids).
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self._validate()

    def _validate(self) -> None:
        """Fail early on the settings this implementation does not support."""
        order = self.embd_layer.get("hd_transform_order", "sub_glb")
        if order != "sub_glb":
            raise ValueError(f"embd_layer.hd_transform_order {order!r} is not supported (only 'sub_glb')")
        if self.img_processor.get("type_feature", "patch") != "patch":
            raise ValueError("img_processor.type_feature: only 'patch' is supported")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        vision = self.vision_tower_config()
        if self.image_dim_out != vision.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out {self.image_dim_out} != vision hidden_size {vision.hidden_size}"
            )
        grid = vision.image_size // vision.patch_size
        if vision.image_size % vision.patch_size or grid % 2:
            raise ValueError(
                f"vision image_size {vision.image_size} / patch_size {vision.patch_size} must give an even grid"
            )

    # ---- derived configs

    @property
    def image_dim_out(self) -> int:
        """Width of one CLIP patch feature (1024 for ViT-L)."""
        return int(self.img_processor.get("image_dim_out", 1024))

    @property
    def rope(self) -> dict[str, Any]:
        """The rope settings in transformers 5's form (``rope_parameters``), whichever transformers is installed."""
        if TRANSFORMERS_4:
            return standard_rope_parameters(
                self.rope_scaling,
                None,
                self.rope_theta,
                self.original_max_position_embeddings,
                self.max_position_embeddings,
            )
        return self.rope_parameters

    @property
    def vision_layer_idx(self) -> int:
        """Which CLIP hidden state feeds the projector (-2: the output of the second-to-last layer)."""
        return int(self.img_processor.get("layer_idx", -2))

    def vision_tower_config(self) -> CLIPVisionConfig:
        """The CLIP tower: official ViT-L/14-336, updated by ``img_processor["vision_config"]`` when present."""
        fields = {**CLIP_VIT_L_14_336, **self.img_processor.get("vision_config", {})}
        config = CLIPVisionConfig(**fields)
        config._attn_implementation = self._attn_implementation
        return config

    def language_model_config(self) -> Phi3Config:
        """transformers' own Phi3Config for the language model (rope "su" becomes "longrope")."""
        config = Phi3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            resid_pdrop=self.resid_pdrop,
            embd_pdrop=self.embd_pdrop,
            attention_dropout=self.attention_dropout,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=self.original_max_position_embeddings,
            initializer_range=self.initializer_range,
            rms_norm_eps=self.rms_norm_eps,
            use_cache=self.use_cache,
            tie_word_embeddings=self.tie_word_embeddings,
            **_phi3_rope_arguments(copy.deepcopy(self.rope)),
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            sliding_window=self.sliding_window,
        )
        config._attn_implementation = self._attn_implementation
        return config

    # ---- serialisation: the official layout

    def to_dict(self) -> dict[str, Any]:
        """Serialise with the rope settings in both forms (``rope_scaling`` as read, and ``rope_parameters``) and
        without a run-time ``_attn_implementation``."""
        output = super().to_dict()
        in_file = output.pop("_rope_scaling_in_file", None)
        rope = copy.deepcopy(self.rope)
        output["rope_scaling"] = in_file if in_file is not None else legacy_rope_scaling(rope)
        output["rope_parameters"] = rope
        output.pop("_attn_implementation", None)
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes: the official key ``torch_dtype`` rather than transformers 5's ``dtype``."""
        output = super().to_diff_dict()
        if output.get("dtype") is not None:
            output["torch_dtype"] = output.pop("dtype")
        return output


def _phi3_rope_arguments(rope: dict[str, Any]) -> dict[str, Any]:
    """``Phi3Config`` keyword arguments for the rope settings, in the form the installed transformers takes."""
    if not TRANSFORMERS_4:
        return {"rope_parameters": rope}
    return {"rope_theta": rope["rope_theta"], "rope_scaling": legacy_rope_scaling(rope)}
