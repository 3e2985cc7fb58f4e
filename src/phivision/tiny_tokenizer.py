"""A tiny Phi-3-style tokenizer, trained locally, for tiny checkpoints and tests.

The real Phi-3-Vision tokenizer is a 32k SentencePiece BPE (Llama layout) with Phi-3's chat tokens added on top.
This builds the same kind of tokenizer with the ``tokenizers`` library in well under a second, deterministically:
SentencePiece-style "▁" space marking (Llama's legacy normalizer, as in the official tokenizer.json), BPE with byte
fallback (so any UTF-8 text round-trips), ``<s>`` added by a post-processor, and the official chat template.
Ids differ from the official ones (the vocabulary is small), so code must always ask the tokenizer for ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from phivision.answer.prompt import DEFAULT_ANSWER_TEMPLATE, DEFAULT_QUESTION, prompt_text

# Llama's three SentencePiece specials keep their official ids 0, 1, 2; Phi-3's chat tokens follow in the
# official order (they are 32000-32010 in the real vocabulary).
BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
PHI3_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
SPECIAL_TOKENS = BASE_SPECIAL_TOKENS + PHI3_SPECIAL_TOKENS
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# The official Phi-3-Vision-128K chat template: no BOS, every turn is "<|role|>\n{content}<|end|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)

_PRODUCT_WORDS = (
    "shirt t-shirt polo dress skirt jeans trousers pants shorts jacket coat trench parka blazer sweater "
    "cardigan hoodie scarf hat cap beanie gloves belt bag tote backpack wallet purse clutch shoes sneakers "
    "boots sandals loafers heels socks watch sunglasses ring necklace bracelet earrings perfume fragrance "
    "lipstick cream lamp chair table sofa mug bottle phone laptop headphones camera speaker toy book "
    "cotton wool silk leather denim cashmere linen check vintage classic logo print striped quilted mini "
    "small medium large black white red blue green brown beige navy grey pink yellow orange gold silver "
    "women men kids baby unisex accessories clothing footwear jewellery beauty home electronics"
)


def default_corpus() -> list[str]:
    """Text the tiny tokenizer always learns from: the training prompt and answer format, digits, product words."""
    lines = [
        prompt_text(),
        DEFAULT_QUESTION,
        DEFAULT_ANSWER_TEMPLATE,
        "Product: Check Cotton Shirt, Category: Shirts, Full Price: 1290.0",
        "0123456789 .,:;!?'\"()[]{}-_/\\+*=%$€£&@#",
        "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
        _PRODUCT_WORDS,
        _PRODUCT_WORDS.title(),
    ]
    lines += [f"Full Price: {p}.0 {p}.5 {p}.99" for p in range(0, 2000, 7)]
    return lines


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a small SentencePiece-style BPE tokenizer with Phi-3's special tokens and chat template.

    Args:
        corpus: extra text to learn merges from (e.g. catalog titles), added to :func:`default_corpus`.
        vocab_size: upper bound on the vocabulary size, special and byte tokens included.

    Returns:
        A fast tokenizer: bos ``<s>`` (added to every encoding), eos and pad ``<|endoftext|>``, unk ``<unk>``.
    """
    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed {reserved} (special and byte tokens), got {vocab_size}")
    texts = default_corpus() + [str(t) for t in (corpus or [])]

    # Llama's (legacy SentencePiece) layout, as in the official tokenizer.json: the normalizer marks spaces with
    # "▁" and prefixes every text segment (each piece between special tokens) with one; the decoder undoes both.
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])

    # 1. Learn merges within words (split before each "▁"), as SentencePiece does.
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - reserved, special_tokens=[], limit_alphabet=200, show_progress=False
    )
    learner.train_from_iterator(texts, trainer=trainer)
    learned = learner.get_vocab()  # token -> id, ids 0..n-1
    merges = _merges(learner)

    # 2. Final vocabulary in the Llama layout: specials, then the 256 byte tokens, then the learned pieces.
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


def _merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The learned BPE merges, read from the serialized model (the Python BPE object does not expose them)."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers < 0.20 wrote "a b" strings, newer versions write ["a", "b"] pairs.
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
