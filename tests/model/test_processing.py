"""Phi3VProcessor: image-tag expansion, batching, training examples, collation and save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from phivision.answer.prompt import PromptFormat, format_answer, prompt_text
from phivision.model.image_processing_phi3_v import Phi3VImageProcessor
from phivision.model.processing_phi3_v import Phi3VProcessor
from phivision.tiny_tokenizer import build_tiny_tokenizer

PROMPT = prompt_text()  # "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n"


@pytest.fixture(scope="module")
def processor():
    return Phi3VProcessor(Phi3VImageProcessor(crop_size=56, num_crops=4), build_tiny_tokenizer())


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def ids_of(processor, text: str) -> list[int]:
    return processor.tokenizer(text)["input_ids"]


def test_one_image_expands_between_two_bos_chunks(processor):
    img = image(120, 90)
    out = processor(text=PROMPT, images=[img], return_tensors="pt")
    n = processor.image_processor(images=[img])["num_img_tokens"][0]
    head, tail = PROMPT.split("<|image_1|>")
    expected = ids_of(processor, head) + [-1] * n + ids_of(processor, tail)
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    bos = processor.tokenizer.bos_token_id
    assert expected[0] == bos and expected[len(ids_of(processor, head)) + n] == bos  # BOS per chunk
    assert out["pixel_values"].shape == (1, 5, 3, 56, 56)
    assert out["image_sizes"].tolist() == processor.image_processor(images=[img])["image_sizes"].tolist()


def test_tag_at_the_edges_still_gives_bos_chunks(processor):
    img = image(60, 60)
    n = processor.image_processor(images=[img])["num_img_tokens"][0]
    bos = processor.tokenizer.bos_token_id
    assert processor(text="<|image_1|>", images=[img])["input_ids"][0].tolist() == [bos] + [-1] * n + [bos]


def test_several_images_in_one_prompt(processor):
    images = [image(120, 60, 1), image(60, 200, 2), image(56, 56, 3)]
    counts = processor.image_processor(images=images)["num_img_tokens"]
    assert len(set(counts)) > 1  # different sizes, so a mix-up would show
    text = "<|user|>\n<|image_1|>a<|image_2|>b<|image_3|>c<|end|><|assistant|>\n"
    ids = processor(text=text, images=images)["input_ids"][0].tolist()
    for k, count in enumerate(counts, start=1):
        assert ids.count(-k) == count
        first = ids.index(-k)
        assert ids[first : first + count] == [-k] * count  # one contiguous block per image
    assert ids.index(-1) < ids.index(-2) < ids.index(-3)
    assert ids.count(processor.tokenizer.bos_token_id) == 4


def test_text_without_images_is_tokenized_whole(processor):
    text = "<|user|>\nHello<|end|><|assistant|>\n"
    out = processor(text=text)
    assert out["input_ids"].tolist() == [ids_of(processor, text)]
    assert "pixel_values" not in out


@pytest.mark.parametrize(
    ("text", "num_images", "message"),
    [
        ("<|image_2|>hi", 1, "in order"),
        ("<|image_0|>hi", 1, "in order"),
        ("<|image_1|><|image_1|>", 1, "in order"),
        ("<|image_2|><|image_1|>", 2, "in order"),
        ("<|image_1|>hi", 0, "image tag"),
        ("hi", 1, "image tag"),
        ("<|image_1|>hi", 2, "image tag"),
    ],
)
def test_bad_tags_raise(processor, text, num_images, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=[image(60, 60, i) for i in range(num_images)] or None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_and_image_order(processor, side):
    images = [image(120, 60, 1), image(60, 120, 2), image(90, 90, 3)]
    texts = [
        prompt_text(num_images=2),
        "<|user|>\nno image here, a longer text<|end|><|assistant|>\n",
        PROMPT,
    ]
    out = processor(text=texts, images=images, padding_side=side)
    pad = processor.tokenizer.pad_token_id
    assert pad == processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    singles = [
        processor(text=texts[0], images=images[:2])["input_ids"][0].tolist(),
        processor(text=texts[1])["input_ids"][0].tolist(),
        processor(text=texts[2], images=images[2:])["input_ids"][0].tolist(),
    ]
    width = max(len(s) for s in singles)
    assert out["input_ids"].shape == (3, width)
    for row, mask, single in zip(
        out["input_ids"].tolist(), out["attention_mask"].tolist(), singles, strict=True
    ):
        padding = [pad] * (width - len(single))
        zeros, ones = [0] * (width - len(single)), [1] * len(single)
        assert row == (padding + single if side == "left" else single + padding)
        assert mask == (zeros + ones if side == "left" else ones + zeros)
    # Images of the whole batch, in the order their tags appear.
    expected = processor.image_processor(images=images)
    torch.testing.assert_close(out["pixel_values"], expected["pixel_values"])
    assert out["image_sizes"].tolist() == expected["image_sizes"].tolist()


def test_num_crops_override_per_call(processor):
    out = processor(text=PROMPT, images=[image(300, 100)], num_crops=2)
    assert out["pixel_values"].shape == (1, 3, 3, 56, 56)
    assert (out["input_ids"] == -1).sum() == processor.image_processor.calc_num_image_tokens(300, 100, 2)
    example = processor.build_example(PROMPT, "x", [image(300, 100)], num_crops=2)
    assert example["pixel_values"].shape == (1, 3, 3, 56, 56)
    assert torch.equal(example["input_ids"][: out["input_ids"].shape[1]], out["input_ids"][0])


def test_chat_template_and_stop_tokens(processor):
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is this?"}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"
    vocab = processor.tokenizer.get_vocab()
    assert processor.stop_token_ids == [vocab["<|end|>"], vocab["<|endoftext|>"], vocab["</s>"]]


# ------------------------------------------------------------------------------------- training


def test_build_example_supervises_only_the_answer_and_end(processor):
    answer = format_answer(PromptFormat(), "Check Cotton Shirt", "Shirts", 1290.0)
    assert answer == "Product: Check Cotton Shirt, Category: Shirts, Full Price: 1290.0"
    img = image(120, 90)
    example = processor.build_example(PROMPT, answer, [img])
    input_ids, labels = example["input_ids"], example["labels"]
    assert input_ids.dim() == labels.dim() == 1 and input_ids.shape == labels.shape

    prompt_ids = processor(text=PROMPT, images=[img])["input_ids"][0]
    supervised = labels != -100
    assert torch.equal(input_ids[: len(prompt_ids)], prompt_ids)
    assert not supervised[: len(prompt_ids)].any()  # prompt and image ids are never supervised
    assert supervised[len(prompt_ids) :].all()
    assert torch.equal(labels[supervised], input_ids[supervised])
    # The tiny tokenizer writes this answer as 12 pieces (no BOS): "▁Product:" "▁Check" "▁Cotton" "▁Shirt" ","
    # "▁Category:" "▁Shirt" "s," "▁Full" "▁Price:" "▁129" "0.0"; plus the closing <|end|> = 13 labels.
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(answer_ids) == 12
    assert int(supervised.sum()) == 13
    assert labels[supervised].tolist() == answer_ids + [processor.tokenizer.convert_tokens_to_ids("<|end|>")]
    assert processor.tokenizer.bos_token_id not in labels[supervised].tolist()
    assert processor.tokenizer.decode(labels[supervised]) == answer + "<|end|>"
    assert example["pixel_values"].shape == (1, 5, 3, 56, 56)
    assert example["image_sizes"].shape == (1, 2)


def test_build_example_text_only(processor):
    example = processor.build_example("<|user|>\nHi<|end|><|assistant|>\n", "Hello", [])
    assert example["pixel_values"] is None and example["image_sizes"] is None
    assert (example["input_ids"] >= 0).all()
    with pytest.raises(ValueError, match="image tag"):
        processor.build_example(PROMPT, "x", [])


def test_collate_pads_and_concatenates_images(processor):
    images = [image(120, 90, 1), image(60, 150, 2)]
    examples = [
        processor.build_example(PROMPT, "Product: A, Category: B, Full Price: 1.0", [images[0]]),
        processor.build_example("<|user|>\nHi<|end|><|assistant|>\n", "Hello there, a longer answer", []),
        processor.build_example(PROMPT, "Product: C", [images[1]]),
    ]
    batch = processor.collate(examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    pad = processor.tokenizer.pad_token_id
    for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][i, :n], ex["input_ids"])
        assert torch.equal(batch["labels"][i, :n], ex["labels"])
        assert (batch["input_ids"][i, n:] == pad).all() and (batch["labels"][i, n:] == -100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert torch.equal(
        batch["pixel_values"], torch.cat([examples[0]["pixel_values"], examples[2]["pixel_values"]])
    )
    assert torch.equal(
        batch["image_sizes"], torch.cat([examples[0]["image_sizes"], examples[2]["image_sizes"]])
    )

    left = processor.collate(examples, padding_side="left")
    n = lengths[1]
    assert torch.equal(left["input_ids"][1, width - n :], examples[1]["input_ids"])
    assert left["attention_mask"][1].tolist() == [0] * (width - n) + [1] * n


def test_collate_text_only_batch_has_no_images(processor):
    examples = [
        processor.build_example("<|user|>\nHi<|end|><|assistant|>\n", a, None) for a in ("A", "Bb Cc")
    ]
    batch = processor.collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(ValueError, match="empty"):
        processor.collate([])


# ------------------------------------------------------------------------------------- save / load


def test_save_and_reload_round_trip(processor, tmp_path):
    files = processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists() and (tmp_path / "tokenizer.json").exists()
    assert not (tmp_path / "processor_config.json").exists()  # official layout
    assert any(str(f).endswith("preprocessor_config.json") for f in files)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "Phi3VImageProcessor"
    assert config["processor_class"] == "Phi3VProcessor"
    assert (config["crop_size"], config["num_crops"]) == (56, 4)

    reloaded = Phi3VProcessor.from_pretrained(tmp_path)
    img = image(150, 100)
    before = processor(text=[PROMPT, "hi"], images=[img])
    after = reloaded(text=[PROMPT, "hi"], images=[img])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(before[key], after[key])
    assert reloaded.stop_token_ids == processor.stop_token_ids
    assert reloaded.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    ) == processor.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert Phi3VProcessor.from_pretrained(tmp_path, num_crops=2).image_processor.num_crops == 2


# ------------------------------------------------------------------------------- what vLLM's Phi-3-V path calls


def test_img_tokens_are_the_tag_strings(processor):
    tags = processor.img_tokens
    assert tags[0] == "<|image_1|>" and tags[9] == "<|image_10|>"
    assert tags[:3] == ["<|image_1|>", "<|image_2|>", "<|image_3|>"]
    assert tags.__getitem__(1) == "<|image_2|>"  # vLLM passes the bound __getitem__ as its target
    with pytest.raises(IndexError):
        tags[len(tags)]


@pytest.mark.parametrize("size", [(50, 8000), (8000, 50), (1, 1), (57, 55), (300, 40), (40, 300)])
def test_token_arithmetic_equals_the_positions_written(processor, size):
    width, height = size
    ids = processor(text="<|image_1|>", images=[image(width, height)])["input_ids"]
    assert processor.calc_num_image_tokens_from_image_size(width=width, height=height) == int((ids < 0).sum())
    one_crop = processor.calc_num_image_tokens_from_image_size(width=width, height=height, num_crops=1)
    ids = processor(text="<|image_1|>", images=[image(width, height)], num_crops=1)["input_ids"]
    assert one_crop == int((ids < 0).sum())


def test_num_crops_from_pretrained_and_saved_tokenizer_class(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x knows this name too
    assert Phi3VProcessor.from_pretrained(tmp_path, num_crops=2).image_processor.num_crops == 2
    reloaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert reloaded.tokenizer(PROMPT)["input_ids"] == processor.tokenizer(PROMPT)["input_ids"]
    # Saved again after loading (as every run and export does): no loading arguments in the config.
    reloaded.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


# ------------------------------------------------------------------------------------ the processor API's options


def test_vllms_call_is_accepted(processor):
    """vLLM's call at engine start-up (vllm/multimodal/processing): the dummy text, its profiling image and
    num_crops from --mm-processor-kwargs, with truncation=False and return_tensors='pt'."""
    tall = image(50, 800)
    out = processor(text="<|image_1|>", images=[tall], num_crops=4, truncation=False, return_tensors="pt")
    assert (
        out["input_ids"].tolist()
        == processor(text="<|image_1|>", images=[tall], num_crops=4)["input_ids"].tolist()
    )
    assert out["pixel_values"].shape[1] == 5  # num_crops honoured


def test_grouped_options_are_read_like_flat_ones(processor):
    texts = ["<|image_1|>a", "<|image_1|>a longer text"]
    images = [image(60, 60), image(60, 60, 1)]
    flat = processor(text=texts, images=images, padding_side="right", num_crops=1)
    grouped = processor(
        text=texts,
        images=images,
        text_kwargs={"padding": True, "padding_side": "right", "truncation": None},
        images_kwargs={"num_crops": 1},
        common_kwargs={"return_tensors": "pt"},
    )
    assert grouped.keys() == flat.keys()
    for key in flat:
        assert torch.equal(grouped[key], flat[key]), key
    with pytest.raises(ValueError, match="given twice"):
        processor(text=texts, images=images, num_crops=4, images_kwargs={"num_crops": 1})


def test_padding_options(processor):
    texts = ["a", "a b c d e f g"]
    short, long_ = (ids_of(processor, t) for t in texts)
    pad = processor.pad_token_id

    out = processor(text=texts, padding="max_length", max_length=20, padding_side="right")
    assert out["input_ids"].tolist()[0] == short + [pad] * (20 - len(short))
    assert out["attention_mask"].sum(1).tolist() == [len(short), len(long_)]

    out = processor(text=texts, pad_to_multiple_of=8)
    assert out["input_ids"].shape[1] % 8 == 0 and out["input_ids"].shape[1] >= len(long_)

    lists = processor(text=texts, padding=False, return_tensors=None)
    assert lists["input_ids"] == [short, long_]
    assert lists["attention_mask"] == [[1] * len(short), [1] * len(long_)]
    with pytest.raises(ValueError, match="make no tensor"):
        processor(text=texts, padding="do_not_pad")
    assert processor(text=texts[:1], padding=False)["input_ids"].tolist() == [
        short
    ]  # one row needs no padding
    with pytest.raises(ValueError, match="more than max_length"):
        processor(text=texts, padding="max_length", max_length=3)
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        processor(text=texts, padding="max_length")
    with pytest.raises(ValueError, match="padding='sideways' is not supported"):
        processor(text=texts, padding="sideways")


def test_truncation_cuts_text_but_never_image_positions(processor):
    img = image(60, 60)
    text = "<|image_1|>" + " word" * 30
    whole = processor(text=text, images=[img])["input_ids"][0].tolist()
    n = whole.count(-1)
    cut = processor(text=text, images=[img], truncation=True, max_length=n + 5)["input_ids"][0].tolist()
    assert cut == whole[: n + 5]
    assert (
        processor(text=text, images=[img], truncation="do_not_truncate", max_length=4)["input_ids"][
            0
        ].tolist()
        == whole
    )
    with pytest.raises(ValueError, match="would cut image positions"):
        processor(text=text, images=[img], truncation=True, max_length=n - 1)


def test_return_options(processor):
    img = image(60, 60)
    as_numpy = processor(text=PROMPT, images=[img], return_tensors="np")
    as_torch = processor(text=PROMPT, images=[img])
    assert isinstance(as_numpy["input_ids"], np.ndarray)
    assert as_numpy["input_ids"].tolist() == as_torch["input_ids"].tolist()
    assert np.array_equal(as_numpy["pixel_values"], as_torch["pixel_values"].numpy())
    assert "attention_mask" not in processor(text=PROMPT, images=[img], return_attention_mask=False)
    no_bos = processor(text=PROMPT, images=[img], add_special_tokens=False)["input_ids"][0].tolist()
    assert no_bos == [i for i in as_torch["input_ids"][0].tolist() if i != processor.tokenizer.bos_token_id]
    with pytest.raises(ValueError, match="return_tensors must be"):
        processor(text=PROMPT, images=[img], return_tensors="tf")


def test_options_for_outputs_not_made_are_accepted_off_and_refused_on(processor):
    off = processor(text="a", return_token_type_ids=False, return_offsets_mapping=False, verbose=False)
    assert off["input_ids"].tolist() == processor(text="a")["input_ids"].tolist()
    with pytest.raises(ValueError, match="return_offsets_mapping is not supported"):
        processor(text="a", return_offsets_mapping=True)
    with pytest.raises(TypeError, match=r"unexpected arguments: \['num_crop'\]"):
        processor(text="a", num_crop=4)  # a misspelt option changes nothing silently
