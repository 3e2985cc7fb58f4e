"""Records -> examples -> batches.

``ProductDataset`` turns catalog rows into supervised examples (the processor masks everything but the answer).
``BatchPlan`` fixes the order of every micro-batch of the run from the seed alone, so micro-batch ``m`` is the
same batch whether the run was interrupted or not: resuming only needs the index of the next micro-batch.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from phivision.data.images import load_image
from phivision.errors import PhivisionError
from phivision.prompt import PromptFormat, format_answer, prompt_text


def split_rows(catalog: pd.DataFrame, split: str, limit: int = 0) -> pd.DataFrame:
    """The rows of one split in catalog order (optionally the first ``limit``)."""
    rows = catalog[catalog["split"] == split].reset_index(drop=True)
    return rows.head(limit) if limit > 0 else rows


class ProductDataset(torch.utils.data.Dataset):
    """One example per catalog row: the prompt with the product image, answered with title, category and price."""

    def __init__(
        self,
        root: str | os.PathLike,
        rows: pd.DataFrame,
        processor: Any,
        fmt: PromptFormat,
        cache: bool = False,
    ):
        self.root = Path(root)
        self.rows = rows.reset_index(drop=True)
        self.processor = processor
        self.fmt = fmt
        self.prompt = prompt_text(fmt)
        self.cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> Image.Image:
        path = self.root / self.rows.at[i, "image_path"]
        try:
            return load_image(path)
        except Exception as err:  # ImageError or an OS error: name the row, not a traceback
            raise PhivisionError(
                f"{path}: catalog row {i} ('{self.rows.at[i, 'product_code']}'): {err}"
            ) from None

    def answer(self, i: int) -> str:
        row = self.rows.iloc[i]
        return format_answer(self.fmt, row["title"], row["category"], row["full_price"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        example = self.processor.build_example(self.prompt, self.answer(i), [self.image(i)])
        if self.cache is not None:
            self.cache[i] = example
        return example

    def lengths(self) -> list[int]:
        """Approximate token counts (text + image tokens from the image's size) for length grouping.

        Reads only image headers: decoding every image just to sort batches would cost as much as an epoch.
        """
        tokenizer = self.processor.tokenizer
        count_image = getattr(self.processor.image_processor, "calc_num_image_tokens", None)
        lengths = []
        for i in range(len(self)):
            text = self.prompt + self.answer(i)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if count_image is not None:
                try:
                    with Image.open(self.root / self.rows.at[i, "image_path"]) as im:
                        n += int(count_image(*im.size))
                except OSError:
                    pass  # unreadable image: __getitem__ raises the real error with the row
            lengths.append(n)
        return lengths


class BatchPlan:
    """The global batches of every epoch, drawn from ``seed`` and the epoch number only.

    With ``group_by_length`` each epoch's shuffled order is cut into mega-batches of 32 global batches, each sorted
    by length, so a batch holds examples of similar length (less padding); batch order is shuffled again so long
    batches do not all come first. The last incomplete global batch of an epoch is dropped, which keeps every
    rank's share equal under DDP.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group_by_length: bool = True):
        if len(lengths) < global_batch:
            raise PhivisionError(
                f"the train split has {len(lengths)} rows, fewer than one global batch ({global_batch}): "
                "lower data.batch_size or add data"
            )
        self.lengths = lengths
        self.global_batch = global_batch
        self.seed = seed
        self.group_by_length = group_by_length
        self.batches_per_epoch = len(lengths) // global_batch
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            mega = self.global_batch * 32
            order = [
                i
                for start in range(0, len(order), mega)
                for i in sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            ]
        b = self.global_batch
        batches = [order[s : s + b] for s in range(0, self.batches_per_epoch * b, b)]
        if self.group_by_length:
            rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def global_batch_at(self, micro: int) -> list[int]:
        """The global batch consumed as micro-batch number ``micro`` of the run (counting across epochs)."""
        epoch, pos = divmod(micro, self.batches_per_epoch)
        return self.epoch(epoch)[pos]

    def epoch_of(self, micro: int) -> float:
        return micro / self.batches_per_epoch

    def total_micro(self, epochs: float) -> int:
        return math.floor(epochs * self.batches_per_epoch)


class RankBatches(torch.utils.data.Sampler):
    """This rank's slice of micro-batches ``start`` .. ``stop - 1`` of a :class:`BatchPlan` (a batch sampler)."""

    def __init__(self, plan: BatchPlan, start: int, stop: int, rank: int, world: int):
        self.plan, self.start, self.stop, self.rank, self.world = plan, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.plan.global_batch // self.world
        for micro in range(self.start, self.stop):
            batch = self.plan.global_batch_at(micro)
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]
