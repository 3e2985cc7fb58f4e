"""LoRA, QLoRA and full fine-tuning: which weights train, and how the base model is loaded for each.

Module names follow the official checkpoint, so target patterns are regexes anchored on full module paths: the
language model's ``qkv_proj`` and CLIP's ``q_proj`` never collide, and CLIP's unused last layer is left out
(spec pitfall 5: it gets no gradient, which DDP would report as an error).
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from phivision.errors import PhivisionError
from phivision.train.config import TrainConfig

VISION_PREFIX = "model.vision_embed_tokens.img_processor."
PROJECTOR_PREFIXES = (
    "model.vision_embed_tokens.img_projection.",
    "model.vision_embed_tokens.glb_GN",
    "model.vision_embed_tokens.sub_GN",
)
_CLIP_LAYERS = r"model\.vision_embed_tokens\.img_processor\.vision_model\.encoder\.layers"


def _vision_layers(model: torch.nn.Module) -> tuple[int, int]:
    """(number of CLIP layers, number of them whose output the model uses)."""
    pattern = re.compile(_CLIP_LAYERS + r"\.(\d+)\.")
    ids = {int(m.group(1)) for name, _ in model.named_parameters() if (m := pattern.match(name))}
    total = max(ids) + 1 if ids else 0
    img_cfg = getattr(model.config, "img_processor", None)
    layer_idx = int(img_cfg.get("layer_idx", -2)) if isinstance(img_cfg, dict) else -2
    # hidden_states[k] is the output of layer k-1 (index 0 is the embeddings); -2 leaves the last layer unused
    used = layer_idx if layer_idx >= 0 else total + 1 + layer_idx
    return total, max(0, min(used, total))


def unused_parameter_names(model: torch.nn.Module) -> list[str]:
    """CLIP layers after the one whose hidden state is used, and ``post_layernorm``: never reached by the loss."""
    total, used = _vision_layers(model)
    unused = re.compile(
        _CLIP_LAYERS + rf"\.({'|'.join(str(i) for i in range(used, total))})\." if used < total else r"(?!x)x"
    )
    return [
        name
        for name, _ in model.named_parameters()
        if unused.match(name) or name.startswith(VISION_PREFIX + "vision_model.post_layernorm.")
    ]


def lora_target_regex(config: TrainConfig, model: torch.nn.Module) -> str:
    """One full-match regex over module names: LM targets, plus the used CLIP layers and the projector if asked."""
    names = "|".join(re.escape(n) for n in config.lora.target_modules)
    parts = [rf"model\.layers\.\d+\.\w+\.(?:{names})", rf"(?:{names})"]  # the second allows e.g. lm_head
    if config.lora.vision:
        _, used = _vision_layers(model)
        layers = "|".join(str(i) for i in range(used))
        parts.append(
            rf"{_CLIP_LAYERS}\.(?:{layers})\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])"
        )
    if config.lora.projector:
        parts.append(r"model\.vision_embed_tokens\.img_projection\.[02]")
    return "|".join(f"(?:{p})" for p in parts)


def quantization_config(config: TrainConfig) -> Any:
    """QLoRA's 4-bit NF4 config; only on CUDA with bitsandbytes, otherwise a clear error."""
    if not torch.cuda.is_available():
        raise PhivisionError(
            "method 'qlora' needs a CUDA GPU (4-bit bitsandbytes); use method=lora on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PhivisionError("method 'qlora' needs bitsandbytes: pip install phivision[qlora]")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if config.precision != "fp16" else torch.float16,
        # the vision tower, projector and head stay in 16 bits: small, and sensitive to quantization
        llm_int8_skip_modules=["img_processor", "img_projection", "lm_head"],
    )


def apply_method(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Mark what trains. LoRA/QLoRA wrap the model with PEFT; full fine-tuning unfreezes all but the frozen parts."""
    unused = set(unused_parameter_names(model))
    if config.method == "full":
        for name, param in model.named_parameters():
            frozen = (
                name in unused
                or (config.freeze.vision and name.startswith(VISION_PREFIX))
                or (config.freeze.projector and name.startswith(PROJECTOR_PREFIXES))
            )
            param.requires_grad_(not frozen)
        return model

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=lora_target_regex(config, model),
        modules_to_save=list(config.lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:  # e.g. a target module name the model does not have
        first = str(err).strip().splitlines()[0] if str(err).strip() else "no module matched"
        raise PhivisionError(
            f"config key 'lora.target_modules': {config.lora.target_modules} do not fit the model ({first})"
        ) from None


def trainable_summary(model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%)"
