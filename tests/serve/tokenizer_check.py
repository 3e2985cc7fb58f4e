"""Run INSIDE a clean virtual environment (no phivision): read a folder's tokenizer files as users of that
transformers release do, and write what they give as JSON.

Usage: ``python tokenizer_check.py SPEC.json OUT.json``; SPEC holds ``folder`` and ``texts``. The tokenizer is
loaded by ``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)``, as vLLM loads it, so an ``auto_map``
in ``tokenizer_config.json`` would be followed. This file imports only the standard library and transformers.
"""

from __future__ import annotations

import hashlib
import json
import sys

import transformers
from transformers import AutoTokenizer

CHAT = [
    {"role": "system", "content": "You read product photos."},
    {"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"},
    {"role": "assistant", "content": "Product: Check Cotton Shirt, Category: shirts, Full Price: 1290.0"},
    {"role": "user", "content": "And the price in euros?"},
]


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=True)
    vocab = sorted(tokenizer.get_vocab().items())
    encodings = [tokenizer(text)["input_ids"] for text in spec["texts"]]
    result = {
        "transformers": transformers.__version__,
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "encodings": encodings,
        "without_specials": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in spec["texts"]],
        "decoded": [tokenizer.decode(ids, skip_special_tokens=True) for ids in encodings],
        "chat": tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        "special": {
            "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token,
            "pad": tokenizer.pad_token,
            "unk": tokenizer.unk_token,
            "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        },
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
