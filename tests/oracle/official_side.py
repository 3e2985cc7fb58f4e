"""Run INSIDE the oracle environment (transformers 4.48, no phivision): Microsoft's official Phi-3-Vision code.

Usage: ``python official_side.py SPEC.json OUT.json``. The checkpoint directory holds the official remote code
beside the weights, as the hub download does, and everything goes through it with ``trust_remote_code=True``:
the official processor makes the inputs, the official model gives the logits and the greedy tokens. Tensors go to
``OUT.safetensors`` beside the JSON, for the test to compare with phivision's own.

The environment is prepared, the official code is never edited:

- torchvision's wheels on PyPI are CUDA builds whose C++ operators cannot load beside the CPU torch; torchvision
  0.2x then fails on import at ``register_fake("torchvision::nms")`` (and ``qnms``), which it does not guard. When
  the operators cannot load, their two schemas are declared (no kernel) before the import. The official image
  processor only uses torchvision's PIL and tensor transforms (resize, pad, ToTensor, Normalize), which are plain
  Python over PIL and torch.
- The official image embedding hard-codes a 24-layer CLIP ViT-L/14-336 (a module-level ``CLIPVisionConfig``). A
  stand-in checkpoint has the real CLIP geometry with fewer layers (``img_processor.vision_config``, which the
  official code does not read), so that module constant is set to the checkpoint's layer count before the model is
  built, and loading must then report no missing or unexpected weights.
- The official ``config.json`` asks for flash_attention_2; without flash-attn the cookbook loads the model with
  ``_attn_implementation="eager"``, and so does this script.

This file imports only the standard library, torch, PIL, safetensors and transformers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def prepare_torchvision() -> str:
    """Make ``import torchvision`` work beside this torch; says what was done."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "torchvision not installed"
    library = next(Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        if library is None:
            raise OSError("no _C extension")
        torch.ops.load_library(str(library))
        return "torchvision operators loaded"
    except OSError:
        for name, schema in TORCHVISION_SCHEMAS.items():
            torch.library.define(f"torchvision::{name}", schema)
        return "torchvision operators unavailable (CUDA build beside CPU torch): nms/qnms schemas declared"


PREPARED = prepare_torchvision()

import transformers  # noqa: E402  (after torchvision is importable: transformers imports it)
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoProcessor  # noqa: E402
from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: E402


def load_official(
    checkpoint: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object, dict]:
    """The official model (eager attention, CLIP depth of the checkpoint) and processor, with the loading info."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    model_class = get_class_from_dynamic_module("modeling_phi3_v.Phi3VForCausalLM", checkpoint)
    embedding = sys.modules[model_class.__module__.rsplit(".", 1)[0] + ".image_embedding_phi3_v"]
    clip_layers = config["img_processor"].get("vision_config", {}).get("num_hidden_layers", 24)
    embedding.CLIP_VIT_LARGE_PATCH14_336_CONFIG.num_hidden_layers = clip_layers
    model, info = model_class.from_pretrained(
        checkpoint, torch_dtype=dtype, _attn_implementation="eager", output_loading_info=True
    )
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    info = {key: sorted(map(str, value)) for key, value in info.items()}
    info["clip_layers"] = clip_layers
    return model.eval(), processor, info


def logit_positions(length: int, most: int) -> list[int]:
    """About ``most`` positions spread over a sequence of ``length``, the last one always included."""
    stride = max(1, -(-length // most))
    return sorted({*range(0, length, stride), length - 1})


def run_case(model, processor, case: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """One prompt with its images: processor tensors, logits at some positions, greedy tokens with margins."""
    name = case["name"]
    images = [Image.open(path).convert("RGB") for path in case["images"]]
    batch = processor(case["prompt"], images=images or None, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        if key in batch:
            tensors[f"{name}.{key}"] = torch.as_tensor(batch[key]).contiguous()
    inputs = {key: batch[key] for key in ("attention_mask", "pixel_values", "image_sizes") if key in batch}
    start = time.perf_counter()
    with torch.no_grad():
        # The official embedding clamps input_ids in place: every call gets its own copy.
        logits = model(input_ids=batch["input_ids"].clone(), **inputs).logits
    forward_seconds = time.perf_counter() - start
    positions = logit_positions(logits.shape[1], case.get("logit_positions", 64))
    tensors[f"{name}.logit_positions"] = torch.tensor(positions)
    tensors[f"{name}.logits"] = logits[0, positions].contiguous()
    generated, margins = greedy(model, {"input_ids": batch["input_ids"].clone(), **inputs}, case)
    return {"generated": generated, "margins": margins, "forward_seconds": round(forward_seconds, 3)}


def greedy(model, inputs: dict, case: dict) -> tuple[list[int], list[float]]:
    """Greedy tokens after the prompt, and at each step the gap between the two best logits (phivision's side
    calls this too: both decode with the same settings)."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=case["max_new_tokens"],
            do_sample=False,
            num_beams=1,
            eos_token_id=case["stop_ids"],
            pad_token_id=case["pad_id"],
            output_scores=True,
            return_dict_in_generate=True,
        )
    top2 = [torch.topk(step[0].float(), 2).values for step in out.scores]
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), [float(v[0] - v[1]) for v in top2]


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchvision": PREPARED,
        "phivision_importable": importlib.util.find_spec("phivision") is not None,
    }
    model, processor, result["loading"] = load_official(spec["checkpoint"])
    result["classes"] = {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "processor": f"{type(processor).__module__}.{type(processor).__qualname__}",
        "tokenizer": type(processor.tokenizer).__name__,
    }
    result["attn_implementation"] = model.config._attn_implementation
    tokenizer = processor.tokenizer
    result["encodings"] = [tokenizer(text)["input_ids"] for text in spec.get("texts", [])]
    result["image_tokens"] = [
        processor.calc_num_image_tokens_from_image_size(width, height)
        for width, height in spec.get("sizes", [])
    ]
    tensors: dict[str, torch.Tensor] = {}
    result["cases"] = {case["name"]: run_case(model, processor, case, tensors) for case in spec["cases"]}
    save_file(tensors, str(Path(out_path).with_suffix(".safetensors")))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
