"""Run INSIDE the oracle environment (transformers 4.48, no phivision): the cookbook's fine-tuning recipe on the
official Phi-3-Vision remote code, for ``bench_vs_official.py``.

Usage: ``python official_recipe.py SPEC.json OUT.json``. The Phi-3 cookbook fine-tunes Phi-3-Vision with the hub
code at batch size 1 (its collator takes one image per example), eager attention where flash-attn is missing, and
the model's own loss over every position's logits; LoRA comes from PEFT. This script does that, written out as a
plain loop so that each step sees exactly the examples phivision saw at that step:

* the official processor makes each prompt (with its image); the answer is tokenized without BOS and closed with
  ``<|end|>``, and only the answer is labelled, as phivision's examples are;
* per step, every example of phivision's batch runs forward and backward alone (batch 1); its mean loss is
  weighted by its share of the step's answer tokens, so the step's gradient is the token-averaged one phivision
  computes (HF Trainer's per-example mean would weight short answers more: another objective);
* LoRA (same rank, alpha, targets, dropout) starts from phivision's initial adapter weights; AdamW, weight decay
  on matrices, gradient clipping and the per-step learning rates are phivision's, so both runs train the same
  function and their losses can be compared to the last digits.

Everything the official code needs prepared (torchvision beside the CPU torch, the CLIP depth, eager attention)
is done by ``tests/oracle/official_side.py``'s :func:`load_official`, imported from there.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oracle"))
import torch  # noqa: E402
from official_side import load_official  # noqa: E402  (prepares torchvision before transformers loads)
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def example(processor, prompt: str, image_path: str, answer: str, end_id: int, device: str) -> dict:
    """One training example as the cookbook's collator builds it: prompt ids from the official processor, then the
    answer; labels only on the answer."""
    batch = processor(prompt, images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    prompt_ids = batch["input_ids"][0]
    answer_ids = torch.tensor(processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id])
    input_ids = torch.cat([prompt_ids, answer_ids])[None]
    labels = torch.cat([torch.full_like(prompt_ids, -100), answer_ids])[None]
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "pixel_values": batch["pixel_values"].to(device),
        "image_sizes": batch["image_sizes"].to(device),
        "answer_tokens": len(answer_ids),
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    torch.manual_seed(spec["seed"])
    model, processor, loading = load_official(spec["checkpoint"], dtype=dtype)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    lora = spec["lora"]
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    initial = load_file(spec["initial_adapter"])
    result = set_peft_model_state_dict(model, initial)
    unexpected = getattr(result, "unexpected_keys", [])
    assert not unexpected, unexpected[:4]
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = spec["optim"]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])
    end_id = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    losses, step_seconds, samples, tokens = [], [], 0, 0
    for step, rows in enumerate(spec["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = spec["learning_rates"][step]
        start = time.perf_counter()
        examples = [example(processor, spec["prompt"], r["image"], r["answer"], end_id, device) for r in rows]
        # position i predicts token i+1: an example's scored tokens are its answer tokens
        step_tokens = sum(ex["answer_tokens"] for ex in examples)
        step_loss = 0.0
        for ex in examples:
            with autocast:
                out = model(
                    input_ids=ex["input_ids"].clone(),  # the official embedding clamps input_ids in place
                    pixel_values=ex["pixel_values"],
                    image_sizes=ex["image_sizes"],
                    labels=ex["labels"],
                    use_cache=False,
                )
            weight = ex["answer_tokens"] / step_tokens
            (out.loss * weight).backward()
            step_loss += out.loss.item() * weight
            tokens += ex["input_ids"].shape[1]
        torch.nn.utils.clip_grad_norm_(params, optim["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
        losses.append(step_loss)
        samples += len(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    result = {
        "losses": losses,
        "step_seconds": step_seconds,
        "samples": samples,
        "tokens": tokens,
        "peak_rss_gib": peak,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "transformers": __import__("transformers").__version__,
        "attn_implementation": model.config._attn_implementation,
    }
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
