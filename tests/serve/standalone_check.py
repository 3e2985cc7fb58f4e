"""Run INSIDE a clean virtual environment (no phivision): load an export the way vLLM and plain transformers do.

Usage: ``python standalone_check.py SPEC.json OUT.json``. Everything goes through transformers' Auto* classes with
``trust_remote_code=True``, i.e. through the model code the export carries. The results (token ids, pixel digests,
image-token counts, generated ids) are written as JSON for the test to compare with phivision's own answers.
This file imports only the standard library, torch, PIL and transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

# From its module: transformers 5.17's top-level AutoImageProcessor is a placeholder that demands torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().float().numpy().tobytes()).hexdigest()


def class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def image_inputs(processor, prompt: str, paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        batch = processor(text=prompt, images=[Image.open(path).convert("RGB")], return_tensors="pt")
        rows.append(
            {
                "input_ids": batch["input_ids"][0].tolist(),
                "pixel_values": digest(batch["pixel_values"]),
                "pixel_shape": list(batch["pixel_values"].shape),
                "image_sizes": batch["image_sizes"].tolist(),
            }
        )
    return rows


def image_token_counts(processor, sizes: list[list[int]]) -> list[dict]:
    """The processor's own arithmetic next to the image positions it writes for a blank image of that size."""
    rows = []
    for width, height in sizes:
        batch = processor(text="<|image_1|>", images=[Image.new("RGB", (width, height), (90, 120, 200))])
        rows.append(
            {
                "size": [width, height],
                "calc": processor.calc_num_image_tokens_from_image_size(width=width, height=height),
                "written": int((batch["input_ids"] < 0).sum()),
                "image_ids": sorted({int(i) for i in batch["input_ids"][0].tolist() if i < 0}),
            }
        )
    return rows


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


def generate(model, processor, prompt: str, paths: list[str], spec: dict) -> list[list[int]]:
    """Greedy ids, one image at a time (batch 1), up to ``max_new_tokens`` or a stop id."""
    out = []
    for path in paths:
        batch = processor(text=prompt, images=[Image.open(path).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                **batch,
                max_new_tokens=spec["max_new_tokens"],
                do_sample=False,
                num_beams=1,
                eos_token_id=spec["stop_ids"],
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        out.append(ids[0, batch["input_ids"].shape[1] :].tolist())
    return out


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    path = spec["checkpoint"]
    result: dict = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "phivision_importable": importlib.util.find_spec("phivision") is not None,
    }

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # as vLLM loads it
    result["classes"] = {
        "config": class_name(config),
        "processor": class_name(processor),
        "image_processor": class_name(image_processor),
        "tokenizer": class_name(tokenizer),
    }
    result["model_type"] = config.model_type
    result["img_tokens"] = list(processor.img_tokens[:3])
    result["num_crops"] = processor.image_processor.num_crops

    # num_crops as a from_pretrained keyword and as a call keyword (vLLM's mm_processor_kwargs).
    one_crop = AutoProcessor.from_pretrained(path, trust_remote_code=True, num_crops=1)
    image = Image.new("RGB", (300, 120), (10, 200, 30))
    result["num_crops_keyword"] = {
        "from_pretrained": one_crop.image_processor.num_crops,
        "from_pretrained_tiles": list(one_crop(text="<|image_1|>", images=[image])["pixel_values"].shape),
        "call_tiles": list(processor(text="<|image_1|>", images=[image], num_crops=2)["pixel_values"].shape),
        "calc_with_one_crop": one_crop.calc_num_image_tokens_from_image_size(width=300, height=120),
    }

    result["encodings"] = [tokenizer(text)["input_ids"] for text in spec["texts"]]
    result["decoded"] = [tokenizer.decode(ids) for ids in result["encodings"]]
    result["chat"] = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>What is this?"}], tokenize=False, add_generation_prompt=True
    )
    result["special"] = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "unk": tokenizer.unk_token,
        "end_id": tokenizer.convert_tokens_to_ids("<|end|>"),
    }
    result["inputs"] = image_inputs(processor, spec["prompt"], spec["images"])
    result["image_tokens"] = image_token_counts(processor, spec["sizes"])

    if spec.get("load_model", True):
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, **{dtype_key: torch.float32}
        ).eval()
        result["classes"]["model"] = class_name(model)
        result["generated"] = generate(model, processor, spec["prompt"], spec["images"], spec)
        result["answers"] = [
            tokenizer.decode(cut_at_stop(ids, spec["stop_ids"]), skip_special_tokens=True).strip()
            for ids in result["generated"]
        ]
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
