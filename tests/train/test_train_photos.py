"""Several photos per prompt (``data.max_images``): the prompt's tags, exact lengths, token budgets, packing,
batched generation with a list of photos per item, and a run whose evaluate, load and export keep its count."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from phivision.answer.generate import generate_completions
from phivision.answer.prompt import PromptFormat, prompt_text
from phivision.api import evaluate
from phivision.data import load_catalog
from phivision.data.sample import write_sample_catalog
from phivision.model import Phi3VForCausalLM
from phivision.model.processing_phi3_v import Phi3VProcessor
from phivision.runs import load_model
from phivision.serve.export import export_run
from phivision.train import train
from phivision.train.config import LoraConfig, TrainConfig, load_config
from phivision.train.data import ProductDataset, make_plan, pack_examples, split_rows
from phivision.train.loop import answer_loss
from phivision.train.methods import apply_method


@pytest.fixture(scope="module")
def views_dataset(tmp_path_factory):
    return write_sample_catalog(tmp_path_factory.mktemp("views") / "data", n=36, seed=0, views=4)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Phi3VProcessor.from_pretrained(tiny_checkpoint)


def dataset(views_dataset, processor, max_images: int) -> ProductDataset:
    rows = split_rows(load_catalog(views_dataset), "train")
    return ProductDataset(views_dataset, rows, processor, PromptFormat(), max_images=max_images)


def test_a_prompt_holds_a_tag_per_photo_in_order(views_dataset, processor):
    data = dataset(views_dataset, processor, max_images=3)
    counts = [len(paths) for paths in data.rows["image_paths"]]
    assert {min(c, 3) for c in counts} == {1, 2, 3}
    for i in range(len(data)):
        k = min(counts[i], 3)
        assert data.paths[i] == list(data.rows.at[i, "image_paths"])[:k]  # the first k, in order
        assert data.prompt(i) == prompt_text(PromptFormat(), k)
        example = data[i]
        ids = example["input_ids"].tolist()
        assert sorted({-t for t in ids if t < 0}) == list(range(1, k + 1))
        assert [ids.index(-j) for j in range(1, k + 1)] == sorted(ids.index(-j) for j in range(1, k + 1))
        assert example["pixel_values"].shape[0] == example["image_sizes"].shape[0] == k
    assert prompt_text(PromptFormat(), 2).startswith("<|user|>\n<|image_1|>\n<|image_2|>What")


def test_lengths_count_every_photo_exactly(views_dataset, processor):
    one, four = dataset(views_dataset, processor, 1), dataset(views_dataset, processor, 4)
    assert four.lengths() == [len(four[i]["input_ids"]) for i in range(len(four))]
    assert one.lengths() == [len(one[i]["input_ids"]) for i in range(len(one))]
    more = [i for i in range(len(four)) if len(four.paths[i]) > 1]
    assert more and all(four.lengths()[i] > one.lengths()[i] for i in more)
    assert all(four.lengths()[i] == one.lengths()[i] for i in range(len(four)) if i not in more)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_token_budget_holds_with_several_photos(views_dataset, processor, packing):
    """A budget that binds (1.5 of the longest example, up to 8 rows): every real micro-batch tensor, padding
    included, fits it; were the photos after the first left out of the lengths, the planner would overfill."""
    data = dataset(views_dataset, processor, 4)
    lengths = data.lengths()
    budget = 3 * max(lengths) // 2
    config = TrainConfig().data
    config.batch_size, config.max_tokens, config.packing = 8, budget, packing
    plan = make_plan(data, config, seed=0, world=1)
    seen, sizes = [], []
    for micro in range(plan.total_micro(1)):
        rows = plan.rank_batch(micro, 0, 1)
        examples = [data[i] for i in rows]
        batch = pack_examples(examples) if packing else processor.collate(examples)
        assert batch["input_ids"].numel() <= budget  # the real tensor, padding included, fits the budget
        assert batch["pixel_values"].shape[0] == sum(len(data.paths[i]) for i in rows)
        seen += rows
        sizes.append(len(rows))
    assert len(seen) == len(set(seen)) > len(data) // 2
    assert max(sizes) > 1 and min(sizes) < 8  # the budget, not batch_size, decided the batches


def test_packed_photos_give_the_padded_loss_and_gradients(views_dataset, processor, tiny_checkpoint):
    data = dataset(views_dataset, processor, 4)
    rows = [i for i in range(len(data)) if len(data.paths[i]) > 1][:2] + [
        next(i for i in range(len(data)) if len(data.paths[i]) == 1)
    ]
    examples = [data[i] for i in rows]
    torch.manual_seed(0)
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    model = apply_method(model, TrainConfig(method="lora", lora=LoraConfig(dropout=0.0))).train()

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        loss, count = answer_loss(model, batch)
        loss.backward()
        return (
            loss.detach(),
            count,
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )

    packed, padded = loss_and_grads(pack_examples(examples)), loss_and_grads(processor.collate(examples))
    assert packed[1] == padded[1] > 0
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-5, atol=1e-5)


def test_generation_takes_a_list_of_photos_per_item(views_dataset, processor, tiny_checkpoint):
    data = dataset(views_dataset, processor, 4)
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval()
    picks = [i for i in range(len(data)) if len(data.paths[i]) > 1][:2] + [0]
    items = [data.images(i) for i in picks]
    together = generate_completions(model, processor, items, batch_size=3, max_new_tokens=6, progress=False)
    for i, item, completion in zip(picks, items, together, strict=True):
        alone = generate_completions(model, processor, [item], batch_size=1, max_new_tokens=6, progress=False)
        assert alone[0].text == completion.text  # batching several photos per row changes no answer
        prompt = len(data[i]["input_ids"]) - (len(data[i]["labels"]) - (data[i]["labels"] == -100).sum())
        assert completion.prompt_tokens == int(prompt)  # every photo's tokens are in the prompt
    # a single photo is an item too, and answers as a list of one
    single = generate_completions(model, processor, [items[0][0]], max_new_tokens=6, progress=False)
    assert single == generate_completions(model, processor, [[items[0][0]]], max_new_tokens=6, progress=False)


def test_a_run_with_several_photos_keeps_its_count(views_dataset, tiny_checkpoint, tmp_path):
    cfg = load_config(
        None,
        [
            "data.batch_size=2",
            "data.max_images=2",
            "schedule.max_steps=2",
            "eval.gen_samples=2",
            "eval.max_samples=2",
            "eval.max_new_tokens=8",
        ],
        model=str(tiny_checkpoint),
        out=str(tmp_path / "run"),
        data={"path": str(views_dataset)},
    )
    run = train(cfg).out
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["max_images"] == 2
    loaded = load_model(run, device="cpu")
    assert loaded.max_images == 2
    metrics = evaluate(
        loaded, views_dataset, out=tmp_path / "eval", limit=6, max_new_tokens=8, progress=False
    )
    assert metrics["max_images"] == 2
    records = [
        json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    catalog = load_catalog(views_dataset).set_index("product_code")
    for record in records:
        photos = list(catalog.loc[record["id"], "image_paths"])[:2]
        assert [p.split("/images/")[-1] for p in record["images"]] == [p.split("/")[-1] for p in photos]
        assert record["image"] == record["images"][0]
    assert evaluate(loaded, views_dataset, limit=2, max_images=1, progress=False)["max_images"] == 1
    exported = export_run(run, tmp_path / "export")
    assert json.loads((exported / "phivision.json").read_text())["max_images"] == 2
    assert load_model(exported, device="cpu").max_images == 2
