"""Records -> examples -> batches.

``ProductDataset`` turns catalog rows into supervised examples (the processor masks everything but the answer):
a product's first ``max_images`` photos, in order, go into one prompt as ``<|image_1|>`` ... ``<|image_k|>``. A
micro-batch of examples is a :class:`Batch`, named tensors with their shapes.
``BatchPlan`` fixes the order of every micro-batch of the run from the seed alone, so micro-batch ``m`` is the
same batch whether the run was interrupted or not: resuming only needs the index of the next micro-batch.
Batches hold a fixed number of rows, or as many as fit a token budget (``data.max_tokens``); the collate pads
them (``Phi3VProcessor.collate``) or packs them into one padding-free row (:func:`pack_examples`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from phivision.answer.prompt import PromptFormat, format_answer, prompt_text
from phivision.data.images import ImageError, image_size, load_image
from phivision.errors import PhivisionError
from phivision.model.processing_phi3_v import stack_images
from phivision.train.config import DataConfig

IGNORE_INDEX = -100


def split_rows(catalog: pd.DataFrame, split: str, limit: int = 0) -> pd.DataFrame:
    """The rows of one split in catalog order (optionally the first ``limit``)."""
    rows = catalog[catalog["split"] == split].reset_index(drop=True)
    return rows.head(limit) if limit > 0 else rows


def photo_paths(rows: pd.DataFrame, max_images: int) -> list[list[str]]:
    """The first ``max_images`` photos of every row, in order (``image_path`` alone where the rows carry no
    ``image_paths``, e.g. a frame built by hand)."""
    if "image_paths" not in rows.columns:
        return [[path] for path in rows["image_path"]]
    return [list(paths)[:max_images] for paths in rows["image_paths"]]


class ProductDataset(torch.utils.data.Dataset):
    """One example per catalog row: the prompt with the product's photos (the first ``max_images``, in order),
    answered with title, category and price."""

    def __init__(
        self,
        root: str | os.PathLike,
        rows: pd.DataFrame,
        processor: Any,
        fmt: PromptFormat,
        cache: bool = False,
        max_images: int = 1,
    ):
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.root = Path(root)
        self.rows = rows.reset_index(drop=True)
        self.processor = processor
        self.fmt = fmt
        self.max_images = max_images
        self.paths = photo_paths(self.rows, max_images)
        self.cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def prompt(self, i: int) -> str:
        """Row ``i``'s prompt: one image tag per photo it uses."""
        return prompt_text(self.fmt, len(self.paths[i]))

    def images(self, i: int) -> list[Image.Image]:
        """Row ``i``'s photos, decoded (an unreadable one stops with a line naming the row and the file)."""
        return [self._load(i, rel) for rel in self.paths[i]]

    def _load(self, i: int, rel: str) -> Image.Image:
        path = self.root / rel
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
        example = self.processor.build_example(self.prompt(i), self.answer(i), self.images(i))
        if self.cache is not None:
            self.cache[i] = example
        return example

    def lengths(self) -> list[int]:
        """Token count of every example, exactly as ``build_example`` makes it: prompt text (with one tag per
        photo) + the image tokens of every photo (from its size) + answer + ``<|end|>``. Token budgets, length
        grouping and packing rely on it being exact.

        Reads only image headers: decoding every image just to plan batches would cost as much as an epoch.
        """
        tokenizer = self.processor.tokenizer
        text_tokens: dict[int, int] = {}  # photos -> text tokens of that prompt
        lengths = []
        for i in range(len(self)):
            k = len(self.paths[i])
            if k not in text_tokens:
                text_tokens[k] = len(self.processor.encode_text(prompt_text(self.fmt, k), [0] * k))
            answer = len(tokenizer(self.answer(i), add_special_tokens=False)["input_ids"])
            lengths.append(text_tokens[k] + self.image_tokens(i) + answer + 1)  # + <|end|>
        return lengths

    def image_tokens(self, i: int) -> int:
        """Image tokens of row ``i``'s photos from their headers (EXIF rotation included, as ``load_image``
        applies it).

        An unreadable photo counts 0: ``__getitem__`` raises the real error, naming the row.
        """
        count = getattr(self.processor.image_processor, "calc_num_image_tokens", None)
        if count is None:
            return 0
        total = 0
        for rel in self.paths[i]:
            try:
                width, height = image_size(self.root / rel, upright=True)
            except ImageError:
                continue
            total += int(count(width, height))
        return total


@dataclass(frozen=True)
class Batch(Mapping):
    """One micro-batch of the training path, padded (``Phi3VProcessor.collate``) or packed (:func:`pack_examples`).

    Also a read-only mapping of its tensors (those that are not None), so ``model(**batch.model_inputs())`` and
    ``batch["labels"]`` both work; the model files stay on the processor's ``dict``/``BatchFeature`` interface.
    """

    input_ids: torch.Tensor  # (rows, tokens); image positions hold negative ids
    labels: torch.Tensor  # (rows, tokens): the answer's ids, -100 where nothing is scored
    attention_mask: torch.Tensor | None = None  # (rows, tokens): 0 on padding; None for a packed row
    position_ids: torch.Tensor | None = None  # (1, tokens) of a packed row: restarts at 0 for every example
    pixel_values: torch.Tensor | None = (
        None  # (images, num_crops + 1, 3, crop, crop): every image, in row order
    )
    image_sizes: torch.Tensor | None = None  # (images, 2): height and width of each image after HD resizing

    @classmethod
    def of(cls, features: Mapping[str, torch.Tensor]) -> Batch:
        """A batch from the processor's features (a dict or a BatchFeature); an unknown key is a bug."""
        if isinstance(features, Batch):
            return features
        return cls(**features)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: v.to(device, non_blocking=True) for k, v in self.items()}
        return dataclasses.replace(self, **moved)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward: every tensor but the labels."""
        return {k: v for k, v in self.items() if k != "labels"}

    def scored_tokens(self) -> int:
        """Tokens the loss counts (a label at position i is the target of position i-1)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def __getitem__(self, key: str) -> torch.Tensor:
        value = getattr(self, key, None) if key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._names() if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def collate_batch(processor: Any, examples: Sequence[dict[str, Any]]) -> Batch:
    """Examples from ``build_example`` -> one padded :class:`Batch` (the processor pads, this names it)."""
    return Batch.of(processor.collate(examples))


def pack_examples(examples: Sequence[dict[str, Any]]) -> Batch:
    """Examples from ``build_example`` -> one padding-free row ``(1, total tokens)``.

    ``position_ids`` restart at 0 for every example and there is no ``attention_mask``: the model reads the
    boundaries from the position ids, so attention never crosses examples (block-diagonal mask with eager/SDPA,
    varlen FlashAttention-2). Each example's first label is -100, so no example is scored on predicting the next
    one's first token. Images are concatenated in row order, as in a padded batch, and land on their own example.
    """
    if not examples:
        raise ValueError("cannot pack an empty list of examples")
    labels = []
    for example in examples:
        row = example["labels"].clone()
        row[0] = IGNORE_INDEX
        labels.append(row)
    return Batch(
        input_ids=torch.cat([ex["input_ids"] for ex in examples])[None],
        labels=torch.cat(labels)[None],
        position_ids=torch.cat([torch.arange(len(ex["input_ids"])) for ex in examples])[None],
        **stack_images(examples),
    )


class BatchPlan:
    """The global batches of every epoch, drawn from ``seed`` and the epoch number only.

    A global batch is ``world`` micro-batches, one per rank. Without a token budget it is ``global_batch`` rows,
    split evenly over the ranks. With ``max_tokens`` each micro-batch takes rows in plan order while they fit:
    padded, rows x longest row <= ``max_tokens``; packed, the sum of their lengths <= ``max_tokens``. Rows per batch
    and batches per epoch then vary (still a function of the seed and the epoch).

    With ``group_by_length`` each epoch's shuffled order is cut into mega-batches of about 32 global batches, each
    sorted by length, so a batch holds examples of similar length (less padding); batch order is shuffled again so
    long batches do not all come first. The last incomplete global batch of an epoch is dropped, which keeps every
    rank's share equal under DDP.
    """

    def __init__(
        self,
        lengths: list[int],
        global_batch: int,
        seed: int,
        group_by_length: bool = True,
        *,
        world: int = 1,
        max_tokens: int = 0,
        packing: bool = False,
    ):
        self.lengths = lengths
        self.seed = seed
        self.group_by_length = group_by_length
        self.world = world
        self.max_tokens = max_tokens
        self.packing = packing
        if max_tokens:
            if max(lengths, default=0) > max_tokens:
                raise PhivisionError(
                    f"an example has {max(lengths)} tokens, more than the token budget data.max_tokens={max_tokens}"
                )
            per_micro = max(1, max_tokens // max(1, round(sum(lengths) / max(1, len(lengths)))))
            self.mega = 32 * world * per_micro
        else:
            if len(lengths) < global_batch:
                raise PhivisionError(
                    f"the train split has {len(lengths)} rows, fewer than one global batch ({global_batch}): "
                    "lower data.batch_size or add data"
                )
            self.mega = 32 * global_batch
        self._fixed_batch = global_batch
        self._sizes: list[int] = []  # global batches of each epoch seen so far
        self._cache: tuple[int, list[list[list[int]]]] | None = None
        self.batches_per_epoch = self._size(0)
        if self.batches_per_epoch == 0:
            raise PhivisionError(
                f"the train split ({len(lengths)} rows) does not fill one global batch of {world} micro-batch(es) "
                f"of at most {max_tokens} tokens: add data or lower data.max_tokens"
            )
        first = self._parts(0)
        # Rows per global batch (a mean under a token budget); for messages and the DeepSpeed micro-batch size.
        self.global_batch = round(sum(len(part) for parts in first for part in parts) / len(first))

    def _order(self, rng: random.Random) -> list[int]:
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            order = [
                i
                for start in range(0, len(order), self.mega)
                for i in sorted(order[start : start + self.mega], key=lambda i: -self.lengths[i])
            ]
        return order

    def _micro_batches(self, order: list[int]) -> list[list[int]]:
        """Cut the order into micro-batches that fit the token budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        longest = total = 0
        for i in order:
            n = self.lengths[i]
            cost = total + n if self.packing else (len(current) + 1) * max(longest, n)
            if current and cost > self.max_tokens:
                batches.append(current)
                current, longest, total = [], 0, 0
            current.append(i)
            longest, total = max(longest, n), total + n
        if current:
            batches.append(current)
        return batches

    def _parts(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's global batches, each as its ``world`` micro-batches."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(self.seed * 100_003 + epoch)
        order = self._order(rng)
        if self.max_tokens:
            micro = self._micro_batches(order)
            w = self.world
            batches = [micro[s : s + w] for s in range(0, len(micro) - len(micro) % w, w)]
        else:
            b = self._fixed_batch
            per_rank = b // self.world
            flat = [order[s : s + b] for s in range(0, len(order) // b * b, b)]
            batches = [
                [batch[r * per_rank : (r + 1) * per_rank] for r in range(self.world)] for batch in flat
            ]
        if self.group_by_length:
            rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def _size(self, epoch: int) -> int:
        while len(self._sizes) <= epoch:
            self._sizes.append(len(self._parts(len(self._sizes))))
        return self._sizes[epoch]

    def _locate(self, micro: int) -> tuple[int, int]:
        epoch = 0
        while micro >= self._size(epoch):
            micro -= self._size(epoch)
            epoch += 1
        return epoch, micro

    def epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches as flat row lists."""
        return [[i for part in parts for i in part] for parts in self._parts(epoch)]

    def global_batch_at(self, micro: int) -> list[int]:
        """The global batch consumed as micro-batch number ``micro`` of the run (counting across epochs)."""
        epoch, pos = self._locate(micro)
        return [i for part in self._parts(epoch)[pos] for i in part]

    def rank_batch(self, micro: int, rank: int, world: int) -> list[int]:
        """Rank ``rank``'s micro-batch of global batch ``micro``."""
        epoch, pos = self._locate(micro)
        parts = self._parts(epoch)[pos]
        if len(parts) == world:
            return parts[rank]
        if self.max_tokens:
            raise ValueError(f"this plan was made for {self.world} rank(s), not {world}")
        flat = [i for part in parts for i in part]
        per_rank = len(flat) // world
        return flat[rank * per_rank : (rank + 1) * per_rank]

    def epoch_of(self, micro: int) -> float:
        epoch, pos = self._locate(micro)
        return epoch + pos / self._size(epoch)

    def total_micro(self, epochs: float) -> int:
        whole = math.floor(epochs)
        return sum(self._size(e) for e in range(whole)) + math.floor((epochs - whole) * self._size(whole))


def make_plan(dataset: ProductDataset, data: DataConfig, seed: int, world: int) -> BatchPlan:
    """The run's batch plan from the ``data`` config: fixed ``batch_size`` rows, or a token budget per micro-batch.

    With ``packing`` and no ``max_tokens``, the budget is what a padded batch of the longest rows would hold
    (``batch_size`` x the longest example).
    """
    lengths = dataset.lengths()
    max_tokens = data.max_tokens
    if data.packing and not max_tokens:
        max_tokens = data.batch_size * max(lengths, default=1)
    if max_tokens and lengths and max(lengths) > max_tokens:
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        raise PhivisionError(
            f"config key 'data.max_tokens': {max_tokens} is less than the longest train example "
            f"({lengths[longest]} tokens, product '{dataset.rows.at[longest, 'product_code']}'); raise it"
        )
    return BatchPlan(
        lengths,
        data.batch_size * world,
        seed,
        data.group_by_length,
        world=world,
        max_tokens=max_tokens,
        packing=data.packing,
    )


class RankBatches(torch.utils.data.Sampler):
    """This rank's slice of micro-batches ``start`` .. ``stop - 1`` of a :class:`BatchPlan` (a batch sampler)."""

    def __init__(self, plan: BatchPlan, start: int, stop: int, rank: int, world: int):
        self.plan, self.start, self.stop, self.rank, self.world = plan, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for micro in range(self.start, self.stop):
            yield self.plan.rank_batch(micro, self.rank, self.world)
