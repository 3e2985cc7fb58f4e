"""The real Phi-3-Vision tokenizer (tests/reference, MIT): prompt and answer token counts, the chat template, and
constrained answers from a model whose embedding has more rows (32,064) than the tokenizer has ids (32,045).

The tiny tokenizer of the other tests has a 1k vocabulary and ids of its own; these tests run phivision's code on
the tokenizer its users have.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from phivision.answer.constrain import AnswerConstraint, answer_guide
from phivision.answer.generate import generate_completions
from phivision.answer.prompt import DEFAULT_QUESTION, PromptFormat, format_answer, parse_answer, prompt_text
from phivision.model import Phi3VForCausalLM, Phi3VProcessor
from phivision.train.config import EvalConfig

# Answers as a luxury or fashion catalog gives them: long titles, accents, dashes, ampersands, decimals.
REAL_ANSWERS = [
    ("Vintage Check Cotton Trench Coat", "coats", 2290.0),
    ("Monogram Canvas Speedy Bandoulière 25 – Limited Édition", "bags & luggage", 1890.5),
    ("Horsebit 1955 Small Shoulder Bag", "bags & luggage", 3100.0),
    ("Slim-Fit Stretch-Cotton Poplin Shirt", "shirts", 395.0),
    ("Cashmere Crew-Neck Sweater", "knitwear", 1150.99),
    ("GG Marmont Matelassé Leather Belt, 4 cm", "belts", 520.0),
]
CATEGORIES = tuple(sorted({category for _, category, _ in REAL_ANSWERS}))


@pytest.fixture(scope="module")
def processor(reference_dir: Path) -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(reference_dir)


def test_the_real_tokenizer_and_its_special_ids(processor: Phi3VProcessor) -> None:
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 32045  # 32,000 pieces and the added tokens up to id 32,044
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>", "<|endoftext|>", "<|assistant|>"]) == [
        1,
        2,
        32000,
        32001,
    ]
    assert tokenizer.convert_tokens_to_ids(["<|end|>", "<|user|>"]) == [32007, 32010]
    assert processor.stop_token_ids == [32007, 32000, 2]
    assert processor.pad_token_id == 32000


def test_the_prompt_is_tokenized_chunk_by_chunk_as_the_official_processor_does(
    processor: Phi3VProcessor,
) -> None:
    """``<|user|>\\n`` + image positions + the question: each text chunk starts with BOS, the image takes
    exactly the processor's count of ``-1`` ids, and the prompt ends on the assistant tag."""
    image = Image.new("RGB", (640, 480), (120, 40, 40))
    batch = processor(text=prompt_text(), images=[image])
    ids = batch["input_ids"][0].tolist()
    image_tokens = processor.calc_num_image_tokens_from_image_size(640, 480)
    assert image_tokens == 1921  # 16 crops: a 3 x 4 grid of 336 px tiles plus the global view
    assert ids.count(-1) == image_tokens
    first = ids.index(-1)
    question = ids[first + image_tokens :]
    assert ids[:first] == [1, 32010, 29871, 13]  # <s> <|user|> "\n"
    words = processor.tokenizer(DEFAULT_QUESTION, add_special_tokens=False)["input_ids"]
    assert question == [1, *words, 32007, 32001]  # <s> question <|end|> <|assistant|> (it eats the "\n")
    assert len(words) == 7 and len(ids) == 4 + 1921 + 1 + 7 + 2 == 1935


@pytest.mark.parametrize(("title", "category", "price"), REAL_ANSWERS)
def test_real_answers_fit_the_default_generation_budget(
    processor: Phi3VProcessor, title: str, category: str, price: float
) -> None:
    """A training example's labels are the answer's tokens (no BOS) plus ``<|end|>``, and real answers need
    fewer tokens than evaluation generates by default."""
    answer = format_answer(PromptFormat(), title, category, price)
    example = processor.build_example(prompt_text(num_images=0), answer)
    labels = [t for t in example["labels"].tolist() if t != -100]
    assert labels == processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [32007]
    assert 1 not in labels
    assert len(labels) <= EvalConfig().max_new_tokens
    assert processor.tokenizer.decode(labels, skip_special_tokens=True) == answer


def test_the_chat_template(processor: Phi3VProcessor) -> None:
    chat = [
        {"role": "system", "content": "You read product photos."},
        {"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"},
        {"role": "assistant", "content": "Product: Check Cotton Shirt, Category: shirts, Full Price: 1290.0"},
        {"role": "user", "content": "And the price?"},
    ]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|system|>\nYou read product photos.<|end|>\n<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n"
        "<|assistant|>\nProduct: Check Cotton Shirt, Category: shirts, Full Price: 1290.0<|end|>\n"
        "<|user|>\nAnd the price?<|end|>\n<|assistant|>\n"
    )
    # The template writes no BOS: the processor adds one to every text chunk.
    ids = processor(text=text, images=[Image.new("RGB", (64, 64))])["input_ids"][0].tolist()
    assert ids[0] == 1 and ids.count(1) == 2


@pytest.fixture(scope="module")
def extra_rows_model(real_tokenizer_checkpoint: Path) -> Phi3VForCausalLM:
    """The real vocabulary's model whose 19 rows past the tokenizer's ids always win: the worst case for a
    mask sized by the tokenizer."""
    model = Phi3VForCausalLM.from_pretrained(real_tokenizer_checkpoint, dtype=torch.float32).eval()
    assert model.config.vocab_size == model.lm_head.out_features == 32064

    def favour_rows_without_ids(module, inputs, logits):
        return logits + torch.cat([torch.zeros(32045), torch.full((19,), 100.0)]).to(logits)

    model.lm_head.register_forward_hook(favour_rows_without_ids)
    return model


def test_constrained_answers_never_use_rows_the_tokenizer_lacks(
    extra_rows_model: Phi3VForCausalLM, real_tokenizer_checkpoint: Path
) -> None:
    processor = Phi3VProcessor.from_pretrained(real_tokenizer_checkpoint)
    images = [
        Image.new("RGB", size, (30 * i, 90, 160)) for i, size in enumerate([(64, 64), (300, 80), (50, 200)])
    ]
    fmt = PromptFormat()
    tokens: list[int] = []

    def run(constraint: AnswerConstraint | None) -> list:
        tokens.clear()
        return generate_completions(
            extra_rows_model,
            processor,
            images,
            fmt,
            batch_size=2,
            max_new_tokens=64,
            progress=False,
            on_token=lambda row, token: tokens.append(token),
            constraint=constraint,
        )

    run(None)
    assert tokens and min(tokens) >= 32045  # unconstrained, the model writes ids no tokenizer can decode
    constraint = AnswerConstraint(fmt, CATEGORIES)
    completions = run(constraint)
    assert max(tokens) < 32045, sorted(set(tokens))[-5:]
    for completion in completions:
        parsed = parse_answer(completion.text, fmt)
        assert parsed.complete and parsed.category in CATEGORIES and parsed.price > 0, completion.text
        assert completion.finished
    guide = answer_guide(processor.tokenizer, constraint, 32064, processor.stop_token_ids[0])
    assert guide.vocab_size == 32064
