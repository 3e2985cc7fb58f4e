"""The tiny Phi-3 tokenizer: special tokens, lossless round trips, save/reload, the official chat template."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from phivision.tiny_tokenizer import CHAT_TEMPLATE, PHI3_SPECIAL_TOKENS, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(["Burberry Burberry Burberry trench", "Café crème brûlée"])


def test_special_tokens_and_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<unk>",
    )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in PHI3_SPECIAL_TOKENS]
    assert len(set(ids)) == len(PHI3_SPECIAL_TOKENS) and min(ids) > 2
    assert (
        tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    )
    # Each special token is one id in running text, never split into pieces.
    for token, token_id in zip(PHI3_SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"].count(token_id) == 1
        assert tokenizer.convert_ids_to_tokens(token_id) == token


def test_bos_is_added_by_default_only(tokenizer):
    with_bos = tokenizer("hello")["input_ids"]
    without = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert with_bos == [tokenizer.bos_token_id, *without]
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id]


def test_image_tags_are_plain_text(tokenizer):
    ids = tokenizer("<|image_1|>", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tokenizer.decode(ids) == "<|image_1|>"


FIXED_TEXTS = [
    "Product: Check Cotton Shirt, Category: Shirts, Full Price: 1290.0",
    " leading space, trailing space ",
    "  two  spaces\tand tab\nnewline\r\n",
    "Ünïcödé: ß, ø, é, 日本語のテキスト, Ελληνικά, emoji 🙂👜, €12,50",
    "zero\u200bwidth and\u00a0nbsp",
]


def test_round_trip_of_arbitrary_text(tokenizer):
    rng = random.Random(0)
    alphabet = list("abcXYZ 019.,:;\n\t\r  éüß日本語🙂€$") + ["\u00a0", "\u0301"]
    texts = FIXED_TEXTS + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Characters never seen in training go through byte fallback, not <unk>.
    assert tokenizer.unk_token_id not in tokenizer(FIXED_TEXTS[3])["input_ids"]


def test_corpus_and_vocab_size(tokenizer):
    assert len(tokenizer) <= 1024
    assert "▁Burberry" in tokenizer.get_vocab()  # learned from the caller's corpus
    small = build_tiny_tokenizer(vocab_size=400)
    assert len(small) <= 400
    assert small.decode(small(FIXED_TEXTS[3])["input_ids"], skip_special_tokens=True) == FIXED_TEXTS[3]
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(vocab_size=200)


def test_building_is_deterministic(tokenizer):
    again = build_tiny_tokenizer(["Burberry Burberry Burberry trench", "Café crème brûlée"])
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_chat_template_matches_the_official_format(tokenizer):
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n"


def test_save_and_reload_keeps_everything(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(tokenizer, attr)
    sample = "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n" + FIXED_TEXTS[3]
    assert reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert reloaded.decode(reloaded(sample)["input_ids"]) == tokenizer.decode(tokenizer(sample)["input_ids"])
    for token in PHI3_SPECIAL_TOKENS:
        assert reloaded(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]
