"""Phi-3-Vision processor: text with ``<|image_N|>`` tags + images -> model inputs, training examples, batches.

Image tags are plain text to the tokenizer. As in the official processor, the text is split on the tags, every
chunk is tokenized on its own with the tokenizer's default special tokens (so every chunk, even an empty one,
starts with BOS), and tag ``<|image_k|>`` becomes ``[-k] * num_img_tokens`` between the chunks. The model fills
the negative positions with image features in order, so tags must be ``<|image_1|>`` ... ``<|image_n|>`` in order,
one per image; images of a batch are the flat list in the order their tags appear.

This file ships inside every export (``trust_remote_code``), so it imports only torch, transformers and its sibling
modules.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_phi3_v import Phi3VImageProcessor

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
END_TOKEN = "<|end|>"
STOP_TOKENS = ("<|end|>", "<|endoftext|>", "</s>")
IGNORE_INDEX = -100

# from_pretrained arguments that locate files; they go to both the image processor and the tokenizer.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")

# transformers 5 saves a tokenizer built from a `tokenizers` object as "TokenizersBackend", a name transformers 4
# does not know; "PreTrainedTokenizerFast" names the same thing (tokenizer.json as is) in both.
_PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Dropped from tokenizer_config.json: how the tokenizer was loaded, which transformers 5 writes back (not a setting
# of the tokenizer, and wrong on any other machine, e.g. local_files_only under HF_HUB_OFFLINE); and `auto_map`,
# which can only be the base checkpoint's (phivision's tokenizer is transformers' own fast tokenizer) and would make
# every `trust_remote_code=True` reader (vLLM included) fetch and run that repository's code.
_DROPPED_KEYS = ("is_local", "local_files_only", "auto_map")
# The official processor's limit on image tags.
MAX_IMAGE_TAGS = 1_000_000

# transformers' processor API groups the call's options (ProcessingKwargs); they are read here as if passed flat.
_KWARG_GROUPS = ("text_kwargs", "images_kwargs", "common_kwargs")
# Tokenizer options that ask for outputs this processor does not make: accepted when off (as every caller that
# spells out the tokenizer's defaults passes them), refused when on, never silently ignored.
_OUTPUTS_NOT_MADE = (
    "return_token_type_ids",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "return_offsets_mapping",
    "return_length",
    "is_split_into_words",
    "stride",
)
_NO_EFFECT = ("verbose",)  # transformers' tokenizer warnings switch: this processor prints none
_PADDING = {
    True: "longest",
    "longest": "longest",
    "max_length": "max_length",
    False: None,
    "do_not_pad": None,
}
_TRUNCATION = {True: True, "longest_first": True, "only_first": True, False: False, "do_not_truncate": False}


class ImageTags(Sequence):
    """``img_tokens[k]`` is ``"<|image_{k+1}|>"``: the tag strings, computed on demand (vLLM reads them)."""

    def __len__(self) -> int:
        return MAX_IMAGE_TAGS

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"image tag index {index} out of range")
        return f"<|image_{index + 1}|>"


def _write_text_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and move it into place (no half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _make_tokenizer_config_portable(directory: Path) -> None:
    """Make ``tokenizer_config.json`` read the same in transformers 4.4x-4.57 and 5.x, and carry no auto_map.

    transformers 5 saves the extra special tokens as a list under ``extra_special_tokens``, a key that 4.x reads as
    a dict of named tokens (``'list' object has no attribute 'keys'``): a list goes back to
    ``additional_special_tokens``, which both read as a list. The class is named so that both majors build it from
    ``tokenizer.json``; see :data:`_DROPPED_KEYS` for what is removed.
    """
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    portable = {key: value for key, value in config.items() if key not in _DROPPED_KEYS}
    name = portable.get("tokenizer_class")
    if name in _PORTABLE_TOKENIZER_CLASS:
        portable["tokenizer_class"] = _PORTABLE_TOKENIZER_CLASS[name]
    extra = portable.get("extra_special_tokens")
    if isinstance(extra, list):
        del portable["extra_special_tokens"]
        additional = [*portable.get("additional_special_tokens", []), *extra]
        portable["additional_special_tokens"] = list(dict.fromkeys(additional))
    if portable != config:
        _write_text_atomically(path, json.dumps(portable, indent=2, ensure_ascii=False) + "\n")


def _load_tokenizer(name: str | os.PathLike, trust_remote_code: bool | None, hub: dict[str, Any]) -> Any:
    """``tokenizer.json`` exactly as the checkpoint has it, the way transformers 4.4x reads the official files.

    Through ``AutoTokenizer``, transformers 5 builds the class ``tokenizer_config.json`` names whenever that file
    also has an ``auto_map`` (``LlamaTokenizer`` for Phi-3-V), and that class rebuilds the pre-tokenizer:
    ``"<|user|>\\n"`` then loses the ``"▁"`` token the official tokenizer writes before the newline. A checkpoint
    without ``tokenizer.json`` (a SentencePiece model only) goes through ``AutoTokenizer``.
    """
    try:
        return PreTrainedTokenizerFast.from_pretrained(name, **hub)
    except (OSError, ValueError):
        # Passed on to AutoTokenizer, which reads config.json (and, without it, would ask about the auto_map).
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **hub)


def count_image_tags(text: str) -> int:
    """How many images ``text`` refers to; raises unless its tags are ``<|image_1|>`` ... ``<|image_n|>`` in order."""
    numbers = [int(n) for n in IMAGE_TAG.findall(text)]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(
            f"image tags must be <|image_1|> ... <|image_n|>, each once and in order; got {numbers} in {text!r}"
        )
    return len(numbers)


def pad_sequences(
    rows: Sequence[Sequence[int]], value: int, side: str = "right", length: int | None = None
) -> torch.Tensor:
    """Stack 1-D id lists into a ``(batch, length)`` long tensor (default: the longest row), padding with
    ``value`` on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("nothing to pad: no rows given")
    longest = max(len(r) for r in rows) if length is None else length
    if any(len(r) > longest for r in rows):
        raise ValueError(f"a row is longer than the padded length {longest}")
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.long)
        if side == "right":
            out[i, : len(row)] = row
        else:
            out[i, longest - len(row) :] = row
    return out


def merge_call_options(named: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The call's options: the named arguments, updated by those passed flat in ``**options`` and by transformers'
    grouped ones (``text_kwargs={...}``, ``images_kwargs``, ``common_kwargs``). An option given twice with two
    values is refused, and so is any option the call does not take (TypeError)."""
    defaults = _call_defaults()
    given = {key: value for key, value in named.items() if value != defaults[key]}
    given.update({key: value for key, value in options.items() if key not in _KWARG_GROUPS})
    for group in _KWARG_GROUPS:
        for key, value in (options.get(group) or {}).items():
            if key in given and given[key] != value:
                raise ValueError(f"{key} is given twice with different values: {given[key]!r} and {value!r}")
            given[key] = value
    for key in _OUTPUTS_NOT_MADE:
        if given.pop(key, None):
            raise ValueError(f"{key} is not supported by Phi3VProcessor (only its off value is accepted)")
    for key in _NO_EFFECT:
        given.pop(key, None)
    unknown = sorted(set(given) - set(named))
    if unknown:
        raise TypeError(f"unexpected arguments: {unknown}")
    return {**named, **given}


def truncate_ids(row: list[int], max_length: int, side: str) -> list[int]:
    """``row`` cut to ``max_length`` ids on ``side``; refused where the cut would drop image positions (the
    image's features would no longer match them)."""
    if len(row) <= max_length:
        return row
    kept, dropped = (
        (row[:max_length], row[max_length:]) if side == "right" else (row[-max_length:], row[:-max_length])
    )
    if any(i < 0 for i in dropped):
        raise ValueError(
            f"truncation to max_length={max_length} would cut image positions out of a row of {len(row)} ids; "
            "raise max_length or shorten the text"
        )
    return kept


def _call_defaults() -> dict[str, Any]:
    """The defaults of :meth:`Phi3VProcessor.__call__`'s named options (defined once, in its signature)."""
    return {name: p.default for name, p in inspect.signature(Phi3VProcessor.__call__).parameters.items()}


def _option(table: dict[Any, Any], name: str, value: Any) -> Any:
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name}={value!r} is not supported (one of {sorted(map(repr, table))})") from None


def stack_images(examples: list[dict]) -> dict:
    """``pixel_values`` and ``image_sizes`` of the examples that have an image, in order (empty when none do):
    the image half of a batch, padded or packed."""
    with_images = [ex for ex in examples if ex.get("pixel_values") is not None]
    if not with_images:
        return {}
    tile_shapes = {tuple(ex["pixel_values"].shape[1:]) for ex in with_images}
    if len(tile_shapes) > 1:
        raise ValueError(f"examples have different pixel_values shapes {sorted(tile_shapes)} (num_crops?)")
    return {
        "pixel_values": torch.cat([ex["pixel_values"] for ex in with_images]),
        "image_sizes": torch.cat([ex["image_sizes"] for ex in with_images]),
    }


class Phi3VProcessor(ProcessorMixin):
    """Image processor + tokenizer for Phi-3-Vision, with training helpers (:meth:`build_example`, :meth:`collate`).

    ``save_pretrained`` writes ``preprocessor_config.json`` and the tokenizer files in the official layout;
    :meth:`from_pretrained` reads them back (also the official hub files).
    """

    attributes = ["image_processor", "tokenizer"]
    # transformers 4.x checks the two parts against these names when the processor is built.
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer: Any) -> None:
        # The chat template lives with the tokenizer (as in the official files); see apply_chat_template.
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> Phi3VProcessor:
        """Load ``preprocessor_config.json`` and the tokenizer from a directory (or hub id).

        The two parts are loaded directly rather than through the Auto* classes, so a checkpoint loads whether or
        not ``phivision`` registered them, and the official files load unchanged (their ``auto_map`` is ignored).
        Other keyword arguments (e.g. ``num_crops=4``) override the image processor's settings.
        """
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        image_processor = Phi3VImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub, **kwargs)
        tokenizer = _load_tokenizer(pretrained_model_name_or_path, trust_remote_code, hub)
        return cls(image_processor, tokenizer)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the official layout: ``preprocessor_config.json`` (atomically) and the tokenizer files.

        No ``processor_config.json``: the official checkpoints have none, and :meth:`from_pretrained` reads the
        image processor's settings from ``preprocessor_config.json``.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = _write_text_atomically(
            directory / "preprocessor_config.json", self.image_processor.to_json_string()
        )
        tokenizer_files = self.tokenizer.save_pretrained(save_directory, **kwargs)
        _make_tokenizer_config_portable(directory)
        return [str(config), *tokenizer_files]

    # ------------------------------------------------------------------------------------------- images

    @property
    def img_tokens(self) -> ImageTags:
        """The image tag strings: ``img_tokens[0] == "<|image_1|>"`` (as the official processor, for vLLM)."""
        return ImageTags()

    def calc_num_image_tokens_from_image_size(
        self, width: int, height: int, num_crops: int | None = None
    ) -> int:
        """How many image positions (negative ids) an image of ``width x height`` pixels takes in ``input_ids``."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height, num_crops)

    # ------------------------------------------------------------------------------------------- tokens

    @property
    def pad_token_id(self) -> int:
        """The id rows are padded with (``<|endoftext|>`` in Phi-3's tokenizer)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|end|>``, ``<|endoftext|>`` and ``</s>``, those the vocabulary has."""
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in STOP_TOKENS if t in vocab]

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """The tokenizer's chat template (the official processor delegates the same way)."""
        return self.tokenizer.apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def encode_text(
        self, text: str, num_img_tokens: Sequence[int] = (), add_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of one text whose tags ``<|image_1|>..<|image_n|>`` take ``num_img_tokens[k-1]`` ids ``-k``.

        Without tags the whole string is tokenized at once (one BOS), as the official processor does.
        ``add_special_tokens=False`` leaves out the BOS of every chunk.
        """
        n = count_image_tags(text)
        if n != len(num_img_tokens):
            raise ValueError(f"text has {n} image tag(s) but {len(num_img_tokens)} image(s) were given")

        def tokens(chunk: str) -> list[int]:
            return list(self.tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])

        if n == 0:
            return tokens(text)
        chunks = IMAGE_TAG.split(text)[::2]  # split() also returns the captured numbers; keep the text parts
        ids = tokens(chunks[0])
        for k, chunk in enumerate(chunks[1:], start=1):
            ids += [-k] * num_img_tokens[k - 1]
            ids += tokens(chunk)
        return ids

    # ------------------------------------------------------------------------------------------- inference

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: list[Any] | None = None,
        padding: bool | str = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        return_attention_mask: bool | None = None,
        add_special_tokens: bool = True,
        num_crops: int | None = None,
        **options: Any,
    ) -> BatchFeature:
        """Texts (+ the flat list of their images) -> ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_sizes``.

        ``pixel_values`` and ``image_sizes`` cover all images of the batch in tag order. The options of
        transformers' processor API are honoured (also grouped as ``text_kwargs``/``images_kwargs``/
        ``common_kwargs``, as transformers and vLLM pass them):

        * ``padding``: ``True``/``"longest"`` (default) pads rows to the longest, ``"max_length"`` to
          ``max_length``, ``False``/``"do_not_pad"`` leaves them as they are (rows of different lengths then need
          ``return_tensors=None``); ``pad_to_multiple_of`` rounds the padded length up; rows are padded with the pad
          id on ``padding_side`` (left for generation);
        * ``truncation``: ``True``/``"longest_first"`` cuts rows longer than ``max_length`` (default: the
          tokenizer's ``model_max_length``) on the tokenizer's ``truncation_side``, and refuses a cut that would drop
          image positions; ``False``/``None`` (vLLM passes ``False``) leaves rows whole;
        * ``return_tensors``: ``"pt"`` (default), ``"np"``, or ``None`` for lists of ids (images stay tensors);
        * ``return_attention_mask=False`` leaves out the mask; ``add_special_tokens=False`` the BOS of each chunk;
        * ``num_crops`` overrides the image processor's setting.

        Tokenizer options for outputs this processor does not make (``return_offsets_mapping``, ...) are accepted
        when off and refused when on; any other option is refused (TypeError), so a misspelt one changes nothing.
        """
        named = {
            "padding": padding,
            "truncation": truncation,
            "max_length": max_length,
            "pad_to_multiple_of": pad_to_multiple_of,
            "padding_side": padding_side,
            "return_tensors": return_tensors,
            "return_attention_mask": return_attention_mask,
            "add_special_tokens": add_special_tokens,
            "num_crops": num_crops,
        }
        merged = merge_call_options(named, options)
        padding = _option(_PADDING, "padding", merged["padding"])
        truncate = _option(_TRUNCATION, "truncation", merged["truncation"] or False)
        max_length, pad_to_multiple_of = merged["max_length"], merged["pad_to_multiple_of"]
        padding_side, return_tensors = merged["padding_side"], merged["return_tensors"]
        return_attention_mask, add_special_tokens = (
            merged["return_attention_mask"],
            merged["add_special_tokens"],
        )
        num_crops = merged["num_crops"]
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if text is None:
            raise ValueError("text is required (use the image processor alone for images only)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images or [])
        image_inputs = self.image_processor(images, num_crops=num_crops) if images else None
        num_img_tokens = image_inputs["num_img_tokens"] if image_inputs else []

        rows, used = [], 0
        for i, t in enumerate(texts):
            n = count_image_tags(t)
            if used + n > len(images):
                raise ValueError(
                    f"text {i} has image tag(s) for {used + n} images but {len(images)} were given"
                )
            rows.append(self.encode_text(t, num_img_tokens[used : used + n], add_special_tokens))
            used += n
        if used != len(images):
            raise ValueError(f"{len(images)} image(s) were given but the text has {used} image tag(s)")
        if truncate:
            limit = max_length if max_length is not None else self.tokenizer.model_max_length
            side = getattr(self.tokenizer, "truncation_side", "right")
            rows = [truncate_ids(row, limit, side) for row in rows]

        data: dict[str, Any] = self._pad_rows(rows, padding, max_length, pad_to_multiple_of, padding_side)
        if return_tensors is not None and not isinstance(data["input_ids"], torch.Tensor):
            raise ValueError(
                f"rows of {sorted({len(r) for r in rows})} ids make no tensor: pass padding=True, or "
                "return_tensors=None for lists"
            )
        if return_tensors is None:
            data = {
                key: value.tolist() if isinstance(value, torch.Tensor) else value
                for key, value in data.items()
            }
        if return_attention_mask is False:
            del data["attention_mask"]
        if image_inputs:
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_sizes"] = image_inputs["image_sizes"]
        return BatchFeature(data=data, tensor_type="np" if return_tensors == "np" else None)

    def _pad_rows(
        self,
        rows: list[list[int]],
        padding: str | None,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        side: str,
    ) -> dict[str, Any]:
        """``input_ids`` and ``attention_mask``: padded tensors, or the rows as they are (``padding=None``)."""
        lengths = {len(row) for row in rows}
        if padding is None:
            if len(lengths) > 1:
                return {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
            length = None
        else:
            length = max_length if padding == "max_length" else max(lengths)
            if max(lengths) > length:
                raise ValueError(
                    f"a row has {max(lengths)} ids, more than max_length={length}: pass truncation=True or a "
                    "larger max_length"
                )
            if pad_to_multiple_of:
                length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        return {
            "input_ids": pad_sequences(rows, self.pad_token_id, side, length),
            "attention_mask": pad_sequences([[1] * len(row) for row in rows], 0, side, length),
        }

    # ------------------------------------------------------------------------------------------- training

    def build_example(
        self, prompt: str, answer: str, images: Sequence[Any] | None = None, num_crops: int | None = None
    ) -> dict[str, Any]:
        """One supervised example: the prompt (with its images) followed by ``answer<|end|>``.

        The answer is tokenized without BOS and closed with ``<|end|>``. ``labels`` are -100 on the prompt
        (image ids included) and equal ``input_ids`` on the answer tokens and that ``<|end|>``, so the model learns
        to answer and to stop. ``pixel_values``/``image_sizes`` are None for a text-only example. ``num_crops``
        overrides the image processor's setting.
        """
        images = list(images or [])
        image_inputs = self.image_processor(images, num_crops=num_crops) if images else None
        prompt_ids = self.encode_text(prompt, image_inputs["num_img_tokens"] if image_inputs else [])
        answer_ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        answer_ids.append(self.tokenizer.convert_tokens_to_ids(END_TOKEN))
        return {
            "input_ids": torch.tensor(prompt_ids + answer_ids, dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids, dtype=torch.long),
            "pixel_values": image_inputs["pixel_values"] if image_inputs else None,
            "image_sizes": image_inputs["image_sizes"] if image_inputs else None,
        }

    def collate(
        self, examples: Sequence[dict[str, Any]], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad examples from :meth:`build_example` into a batch.

        ``input_ids`` are padded with the pad id, ``labels`` with -100, ``attention_mask`` is 0 on padding.
        ``pixel_values``/``image_sizes`` are the examples' images concatenated in row order, and are left out when
        no example has an image (text-only rows simply have no negative ids).
        """
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        ids = [ex["input_ids"] for ex in examples]
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, padding_side),
            "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0, padding_side),
            "labels": pad_sequences([ex["labels"] for ex in examples], IGNORE_INDEX, padding_side),
        }
        batch.update(stack_images(examples))
        return batch
