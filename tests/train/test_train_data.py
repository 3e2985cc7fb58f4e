"""Records -> examples -> batches: answer-only labels, padding, length grouping, a seed-only batch order."""

from __future__ import annotations

import pytest
import torch

from phivision.answer.prompt import PromptFormat, parse_answer
from phivision.data import load_catalog
from phivision.errors import PhivisionError
from phivision.model.processing_phi3_v import Phi3VProcessor
from phivision.train.data import BatchPlan, ProductDataset, RankBatches, split_rows


@pytest.fixture(scope="module")
def train_set(tiny_checkpoint, sample_dataset):
    rows = split_rows(load_catalog(sample_dataset), "train")
    return ProductDataset(
        sample_dataset, rows, Phi3VProcessor.from_pretrained(tiny_checkpoint), PromptFormat()
    )


def test_labels_cover_only_the_answer(train_set):
    example = train_set[0]
    labels, ids = example["labels"], example["input_ids"]
    answer = labels[labels != -100]
    text = train_set.processor.tokenizer.decode(answer.tolist(), skip_special_tokens=True)
    assert parse_answer(text) == parse_answer(train_set.answer(0))
    first = int((labels != -100).nonzero()[0])
    assert torch.equal(labels[first:], ids[first:])  # a contiguous answer at the end
    assert (ids[:first] < 0).any()  # the prompt holds the image tokens, all unsupervised


def test_batches_larger_than_one_pad_rows_and_labels(train_set):
    examples = [train_set[i] for i in range(3)]
    batch = train_set.processor.collate(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (
        (batch["labels"] != -100).sum(1) == torch.tensor([(e["labels"] != -100).sum() for e in examples])
    ).all()
    assert batch["pixel_values"].shape[0] == 3


def test_plan_is_a_function_of_seed_and_epoch():
    lengths = [5, 50, 7, 48, 6, 52, 8, 49, 30, 31, 29, 33]
    a, b = BatchPlan(lengths, 4, seed=1), BatchPlan(lengths, 4, seed=1)
    assert [a.global_batch_at(m) for m in range(9)] == [b.global_batch_at(m) for m in range(9)]
    assert a.epoch(0) != a.epoch(1)
    assert sorted(i for batch in a.epoch(0) for i in batch) == list(range(12))  # each row once per epoch
    assert BatchPlan(lengths, 4, seed=2).epoch(0) != a.epoch(0)


def test_length_grouping_reduces_padding():
    lengths = [10 + (i * 37) % 200 for i in range(256)]

    def padding(plan: BatchPlan) -> int:
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan.epoch(0))

    assert (
        padding(BatchPlan(lengths, 8, 0, group_by_length=True)) < padding(BatchPlan(lengths, 8, 0, False)) / 3
    )


def test_ranks_split_each_global_batch():
    plan = BatchPlan(list(range(20)), 4, seed=0)
    ranks = [list(RankBatches(plan, 3, 8, rank, 2)) for rank in (0, 1)]
    for m, (r0, r1) in enumerate(zip(*ranks, strict=True), start=3):
        assert r0 + r1 == plan.global_batch_at(m)
    assert len(ranks[0]) == 5


def test_too_few_rows_is_a_clear_error():
    with pytest.raises(PhivisionError, match="fewer than one global batch"):
        BatchPlan([1, 2, 3], 4, seed=0)
