"""Every option of every verb, declared once: type, default, range or choices, help (see :mod:`phivision.options`).

The groups shared by several verbs come first (model loading, generation, downloads...), then one group per verb
holding its own inputs and the shared groups it takes. ``phivision.api`` makes each verb's Python function from
its group, ``phivision.cli`` its flags, ``docs/cli.md`` is generated from them, and the library functions take the
groups. To add a flag, add a field here (README: "Adding an option").

Only the standard library is imported: ``phivision --help`` reads these declarations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phivision.errors import PhivisionError
from phivision.netguard import AddressPolicy
from phivision.options import REQUIRED, OptionError, Options, group, option

# Objects of the layers above (phivision.runs.LoadedModel, phivision.train.config.TrainConfig), named for the
# signatures and accepted as they are: the verb that receives one uses it, this module imports nothing above it.
LoadedModel = TrainConfig = object

# ------------------------------------------------------------------------------------------ constants

SEED_MAX = 2**32 - 1  # numpy's seed range
SEED = f"in [0, {SEED_MAX}]"
SPLITS = ("train", "val", "test")
SPLIT = "0.8,0.1,0.1"  # train,val,test ratios (sample and prepare)
SAMPLE_N = 600  # products drawn by `phivision sample` (with --like: as many as the dataset it copies)
# A synthetic product is a drawn JPEG of about 10 KB kept in memory until the catalog is written: a million is
# about 10 GB of images and an hour of drawing on one core; anything larger is a typo, not a test set.
SAMPLE_MAX = 1_000_000
SAMPLE_VIEWS_MAX = 4  # the photos a synthetic product can have: front, detail, back, packshot
MAX_PRICE = 1_000_000_000.0  # a price above this is a typo or a placeholder (absurd_price), never a product
MAX_PIXELS = 40_000_000  # the largest image (width x height) any reader decodes: decompression bombs beyond
MAX_BYTES = 50_000_000  # the largest image file any reader reads (download, local file, dataset image)
MAX_NEW_TOKENS = 64  # the longest answer generated (evaluate, predict, serve)
# Export shards: the official checkpoint's 8.3 GB of bf16 weights come in two files (4.94 and 3.35 GB); a 5 GB
# bound gives the same two, a 4 GB bound three.
MAX_SHARD_SIZE = "5GB"

PRICE_LEVEL = 0.8  # the share of new products whose true price lies in an answer's price range
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
CONSTRAIN = (
    "Force every answer into the run's answer template: the category one of the taxonomy's (the model's "
    "recorded categories, else --categories, else the train split of --data), the price a positive number. "
    "--no-constrain lets the model write freely."
)
MODEL = "Training RUN directory, checkpoint directory or hub id."
DATASET = "Dataset directory (catalog.parquet + images/)."


def seed(help: str) -> Any:
    return option(0, help, check=SEED)


def progress() -> Any:
    return option(True, "Show a progress bar.")


def max_images() -> Any:
    return option(
        None,
        "Photos of a product per prompt, its first N in order [default: as many as the model was trained with, "
        "its data.max_images; 1 when it records none].",
        check=">= 1",
    )


# ------------------------------------------------------------------------------------------- rules


def parse_ratios(value: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` (fractions that sum to 1) or ``"8,1,1"`` / ``"80,10,10"`` (whole parts) -> train, val
    and test fractions; one ``error:`` line naming ``--split`` otherwise."""
    try:
        return split_ratios(value)
    except ValueError as err:
        raise OptionError("--split", value, str(err)) from None


def split_ratios(value: str | Sequence[float]) -> tuple[float, float, float]:
    """:func:`parse_ratios` raising ``ValueError(problem)`` (the rule of the ``split`` options)."""
    try:
        values = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise ValueError("expected three numbers such as 0.8,0.1,0.1") from None
    total = sum(values)
    if len(values) != 3 or any(not v >= 0 for v in values) or not 0 < total < math.inf or values[0] == 0:
        raise ValueError("expected three non-negative numbers with train > 0")
    if not all(float(v).is_integer() for v in values) and abs(total - 1) > 0.005:
        raise ValueError(
            f"the fractions sum to {total:g}, not 1 (give fractions such as 0.8,0.1,0.1 or whole parts such as 8,1,1)"
        )
    return (values[0] / total, values[1] / total, values[2] / total)


def parse_num_crops(value: str | Sequence[int]) -> list[int]:
    """``"1,4,8,16"`` -> ``[1, 4, 8, 16]`` (sorted, unique)."""
    try:
        crops = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise ValueError("expected whole numbers such as 1,4,16") from None
    if not crops or any(c < 1 for c in crops):
        raise ValueError("every value must be at least 1")
    return sorted(set(crops))


def square_tokens(value: int) -> None:
    """Image tokens per tile come from a side x side grid of merged patches (official: 144 = 12 x 12)."""
    if math.isqrt(value) ** 2 != value:
        raise ValueError("tokens per tile must be a square number (a side x side grid, e.g. 144 = 12 x 12)")


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MIN_SHARD = 10**6  # 1MB: a smaller bound only multiplies files (every larger tensor gets a shard of its own)


def byte_size(value: str | int) -> int:
    """``"4GB"`` (10^9 bytes), ``"500MB"``, ``"5GiB"`` (2^30) or a number of bytes -> bytes, at least 1MB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if isinstance(value, bool) or match is None:
        raise ValueError("expected a size such as 4GB, 500MB or 5GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])
    if size < MIN_SHARD:
        raise ValueError("must be at least 1MB (smaller shards only multiply the files)")
    return size


# ------------------------------------------------------------------------------------ shared groups


@dataclass
class ModelLoading(Options):
    """How a model is loaded for inference (evaluate, predict, serve, load_model)."""

    dtype: str | None = option(
        None,
        "Weights' dtype: float32, bfloat16 or float16 (default: the checkpoint's own, bf16 for the official "
        "model, where the device computes it natively: a GPU, a CPU with AVX512-BF16 or AMX; else float32).",
        choices=DTYPES,
    )
    device: str | None = option(None, "cuda, cpu, cuda:1... (default: cuda if available).")


@dataclass
class Generation(Options):
    """How answers are generated (greedy, batched): evaluate and predict; train's ``eval`` section too."""

    batch_size: int = option(8, "Images per generation batch.", check=">= 1")
    max_new_tokens: int = option(MAX_NEW_TOKENS, "Longest answer generated, in tokens.", check=">= 1")
    constrain: bool = option(True, CONSTRAIN, flags=("--constrain/--no-constrain",))


@dataclass
class Answering(Options):
    """What an answer chooses its category from, and how sure its price range is (evaluate, predict, serve)."""

    categories: Path | None = option(
        None,
        "File of categories (one per line, or a JSON list) for a model that records none: the category space "
        "is the model's recorded categories, else this file, else the train split of --data where there is one.",
    )
    price_level: float = option(
        PRICE_LEVEL,
        "Level of each answer's price range (price_low to price_high): the share of new products whose price "
        "lies inside, calibrated on the val split. Needs constrained answers and a calibrated model.",
        check="in (0, 1)",
    )


@dataclass
class Columns(Options):
    """Which source column holds each field (prepare). Defaults fit the DBQ ``<Brand>.Product.prices.<Country>``
    datasets."""

    title_col: str = option("title", "Column with the product name.")
    category_col: str = option("category3_code", "Column with the category.")
    price_col: str = option(
        "full_price", "Column with the full price ($1,290.00, 1.290,00 EUR, 1290, USD 1290.5)."
    )
    image_col: list[str] = option(
        help="Column with the image URL, or with a list of a product's photo URLs (a JSON array, a parquet list, or "
        "text split on --image-sep). Repeat for several columns (image1, image2...): the photos in column order.",
        factory=lambda: ["imageurl"],
    )
    code_col: str = option("product_code", "Column with the product code.")
    currency_col: str = option("currency_code", "Column with the currency code.")
    image_sep: str | None = option(
        None, "Separator of several photo URLs in one image cell, e.g. '|' (JSON arrays are read without it)."
    )
    group_by_code: bool = option(
        False,
        "Rows that share a product code are one product, their photos in row order (a shop export repeating the "
        "product once per photo); a row with only a code and photos adds its photos to its code's product.",
    )

    def check(self) -> None:
        if not self.image_col or any(not c.strip() for c in self.image_col):
            raise PhivisionError(f"--image-col {self.image_col!r}: give one or more column names")
        repeated = sorted({c for c in self.image_col if self.image_col.count(c) > 1})
        if repeated:
            raise PhivisionError(f"--image-col {', '.join(repeated)}: named more than once")
        if self.image_sep is not None and not self.image_sep:
            raise PhivisionError("--image-sep '': must be a non-empty separator such as '|'")

    def by_field(self) -> dict[str, str | list[str]]:
        """Catalog field -> source column (``image_url``: the image columns)."""
        return {
            "title": self.title_col,
            "category": self.category_col,
            "price": self.price_col,
            "image_url": self.image_col,
            "product_code": self.code_col,
            "currency": self.currency_col,
        }


@dataclass
class Prices(Options):
    """How prices are read (prepare)."""

    currency: str | None = option(None, "One currency for every row (then --currency-col is not needed).")
    decimal_comma: bool | None = option(
        None,
        "The prices' decimal mark, for numbers that read two ways (1.290 is 1290 or 1.29). Default: each price "
        "column's majority of unambiguous values (stated in the report); none: such rows are dropped as "
        "ambiguous_price.",
        flags=("--decimal-comma/--decimal-point",),
    )
    max_price: float = option(
        MAX_PRICE, "Drop prices above this as absurd_price (typos, placeholders).", check="> 0"
    )


@dataclass
class Download(Options):
    """How politely and how persistently images are fetched (prepare); the defaults suit a CDN."""

    concurrency: int = option(64, "Downloads in flight overall.", check=">= 1")
    per_host: int = option(32, "Downloads in flight per host.", check=">= 1")
    connect_timeout: float = option(10.0, "Seconds to wait for a connection.", check="> 0")
    read_timeout: float = option(30.0, "Seconds to wait for the next bytes.", check="> 0")
    download_timeout: float = option(
        180.0, "Seconds one download attempt may take in all (ends slow-drip responses).", check="> 0"
    )
    retries: int = option(
        3, "Retries after connection errors, timeouts, 5xx and 429 (never other 4xx).", check=">= 0"
    )
    backoff: float = option(0.5, "First retry delay in seconds; doubles, with jitter.", check=">= 0")
    max_wait: float = option(30.0, "Cap in seconds on any backoff or Retry-After wait.", check=">= 0")
    max_bytes: int = option(
        MAX_BYTES, "Largest image file accepted, downloaded or local, in bytes.", check=">= 1"
    )
    max_pixels: int = option(
        MAX_PIXELS, "Reject images with more pixels (decompression bombs).", check=">= 1"
    )
    allow_local: bool = option(
        False,
        "Accept file:// URLs and local paths in the image column (regular files only; default: http(s) only).",
    )
    policy: AddressPolicy = option(
        help="Which addresses besides the public internet may be fetched (Python only; link-local and cloud "
        "metadata never).",
        factory=AddressPolicy,
        cli=False,
    )


@dataclass
class ServeLimits(Options):
    """What one ``phivision serve`` process accepts; the defaults suit product photos on one GPU."""

    max_batch_size: int = option(8, "Most concurrent requests answered in one batch.", check=">= 1")
    max_wait_ms: float = option(10.0, "How long a batch waits for more requests to join.", check=">= 0")
    max_batch_pixels: int = option(
        MAX_PIXELS, "Decoded pixels one batch may hold (bounds memory; one image always fits).", check="> 0"
    )
    max_upload_mb: float = option(
        10.0,
        "Largest image file accepted (bigger ones get 413); a bound under 0.01 (10 KB) would refuse every photo.",
        check=">= 0.01",
    )
    max_pixels: int = option(
        MAX_PIXELS, "Largest image in pixels (bigger ones, e.g. decompression bombs, get 413).", check="> 0"
    )
    max_queue: int = option(256, "Most requests waiting for the model (more get 503).", check="> 0")
    max_queue_mb: float = option(512.0, "Most image bytes waiting for the model (more get 503).", check="> 0")
    max_new_tokens: int = option(
        MAX_NEW_TOKENS,
        "Longest answer generated, in tokens: a chat request's larger max_tokens is capped to it.",
        check="> 0",
    )
    body_timeout: float = option(
        60.0, "Seconds a client may take to send its request body (then 408).", check="> 0"
    )
    answer_timeout: float = option(
        300.0, "Seconds a request may wait for its answer (then 504).", check="> 0"
    )
    remote_image_timeout: float = option(
        10.0, "Seconds for fetching one http(s) image, redirects included.", check="> 0"
    )
    max_remote_fetches: int = option(
        16,
        "Most http(s) images fetched at once; more wait for a slot within --remote-image-timeout, then get 503.",
        check=">= 1",
    )
    max_connections: int = option(
        1000,
        "Most connections held at once (kept below the open-file limit); one more gets 503 and is closed, "
        "except a few kept for /healthz.",
        check=">= 1",
    )
    header_timeout: float = option(
        15.0,
        "Seconds a client may take to send a request's headers, from connecting or from its previous answer "
        "(then 408 and the connection is closed).",
        check="> 0",
    )
    keep_alive_timeout: float = option(
        5.0, "Seconds an idle kept-alive connection stays open between requests.", check="> 0"
    )
    max_redirects: int = option(
        5, "Redirects followed when fetching an http(s) image (Python only).", check=">= 0", cli=False
    )
    constrain: bool = option(True, CONSTRAIN, flags=("--constrain/--no-constrain",))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_queue_bytes(self) -> int:
        return int(self.max_queue_mb * 1024 * 1024)


# ------------------------------------------------------------------------------------------- verbs


@dataclass
class SampleArgs(Options):
    """``phivision sample``."""

    out: Path = option(
        REQUIRED, "Dataset directory to write (rerun the same command to redo it).", positional=True
    )
    n: int | None = option(
        None,
        f"Number of products [default: {SAMPLE_N}; with --like: as many as that dataset].",
        check=f"in [1, {SAMPLE_MAX}]",
        what="a whole number of products",
    )
    seed: int = seed("Random seed (attributes, prices, drawings and split).")
    split: str | Sequence[float] | None = option(
        None,
        f"Train,val,test ratios [default: {SPLIT}; with --like: that dataset's ratios].",
        rule=split_ratios,
    )
    urls_out: Path | None = option(
        None, "Also write a CSV of image URLs in the DBQ schema, to try `prepare` against a server."
    )
    base_url: str = option(
        "http://127.0.0.1:8000", "URL at which --out is served (e.g. `python -m http.server -d OUT 8000`)."
    )
    like: Path | None = option(
        None,
        "Copy the structure of this dataset (categories and proportions, per-category prices, title patterns, "
        "photos per product, image sizes, split ratios) without any of its titles or images.",
    )
    overwrite: bool = option(False, "Replace another dataset found in --out (default: refuse).")
    views: int = option(
        1,
        "The most photos per product: each product gets 1 to N (front, detail of the material, back, packshot), "
        "with some price and category cues only in the later photos. 1: one photo showing everything.",
        check=f"in [1, {SAMPLE_VIEWS_MAX}]",
        what="a whole number of photos",
    )

    def check(self) -> None:
        if self.like is not None and self.urls_out is not None:
            raise PhivisionError("--urls-out: not available with --like")
        if self.like is not None and self.views != 1:
            raise PhivisionError("--views: not available with --like (the photos per product are copied)")


@dataclass
class PrepareArgs(Options):
    """``phivision prepare``."""

    source: list[str] = option(
        REQUIRED,
        "Product table: a hub dataset id (e.g. DBQ/Burberry.Product.prices.United.States), a local dataset "
        "directory, or a .csv/.tsv/.parquet/.jsonl file. Repeat to combine several sources.",
        positional=True,
    )
    out: Path = option(
        REQUIRED, "Dataset directory to write (rerun the same command to resume).", positional=True
    )
    columns: Columns = group(Columns)
    prices: Prices = group(Prices)
    hub_split: str = option("train", "Split of a hub or local dataset to read.")
    hub_config: str | None = option(None, "Configuration (subset) name of a hub dataset.")
    revision: str | None = option(None, "Hub dataset revision (branch, tag or commit).")
    split: str | Sequence[float] = option(
        SPLIT, "Train,val,test ratios, stratified by category.", rule=split_ratios
    )
    seed: int = seed("Seed of the split.")
    limit: int | None = option(None, "Use only the first N rows of each source.", check=">= 1")
    download: Download = group(Download)
    overwrite: bool = option(False, "Replace another dataset found in --out (default: refuse).")
    progress: bool = progress()

    def check(self) -> None:
        if not self.source:
            raise PhivisionError("--source: give at least one table or hub dataset")


@dataclass
class InspectArgs(Options):
    """``phivision inspect``."""

    data: Path = option(REQUIRED, DATASET, positional=True, argument=True)
    out: Path | None = option(
        None, "HTML file to write [default: DATA/inspect.html]; the JSON goes beside it."
    )
    num_crops: str | Sequence[int] = option(
        "1,4,8,16", "num_crops values to cost in image tokens, comma-separated.", rule=parse_num_crops
    )
    crop_size: int = option(
        336, "Tile side in pixels (official Phi-3-Vision: 336).", check=">= 1", what="a whole number"
    )
    num_img_tokens: int = option(
        144, "Image tokens per tile, a square number (official: 144).", check=">= 1", what="a whole number",
        rule=square_tokens,
    )  # fmt: skip
    near_duplicate_bits: int = option(
        6,
        "Images at most this many perceptual-hash bits apart (of 64) are near-duplicates.",
        check="in [0, 32]",
    )
    progress: bool = progress()


@dataclass
class TinyArgs(Options):
    """``phivision tiny``."""

    out: Path = option(REQUIRED, "Checkpoint directory to write.", positional=True)
    seed: int = seed("Random seed for the weights.")
    num_crops: int = option(4, "Most image tiles per image the processor makes.", check=">= 1")


@dataclass
class TrainArgs(Options):
    """``phivision train`` (the training config itself: :class:`phivision.train.config.TrainConfig`)."""

    out: Path | None = option(
        REQUIRED,
        "Run directory to write (weights, processor, config, metrics, checkpoints).",
        positional=True,
        cli_required=False,  # `--print-config` needs none
    )
    data: Path | None = option(None, DATASET)
    model: str | None = option(None, "Base checkpoint: a local directory or a hub id.")
    config: Path | TrainConfig | None = option(
        None,
        "Training YAML (e.g. configs/lora.yaml) or, in Python, a TrainConfig; default: built-in defaults.",
    )
    resume: bool = option(
        False, "Continue the run in --out from its newest checkpoint (same data order, RNG, optimizer)."
    )
    print_config: bool = option(
        False,
        "Print the resolved config as YAML (defaults, then --config, then --data/--model/--out, then overrides), "
        "checked, and exit without training.",
        flags=("--print-config",),
        api=False,
    )
    overrides: list[str] | None = option(
        None,
        "Config overrides as dotted key=value, e.g. method=full optim.lr=1e-4 lora.r=32 (every key: docs/config.md).",
        argument=True,
    )
    progress: bool = progress()


@dataclass
class EvaluateArgs(Options):
    """``phivision evaluate``."""

    model: str | LoadedModel = option(REQUIRED, MODEL + " In Python also a LoadedModel.", positional=True)
    data: Path = option(REQUIRED, DATASET, positional=True)
    out: Path | None = option(
        None,
        "metrics.json path, or a directory (e.g. RUN/eval/after); predictions.jsonl goes beside it. In Python, "
        "None writes nothing.",
        positional=True,
        cli_required=True,
    )
    split: str = option("test", "Split to score.", choices=SPLITS)
    limit: int | None = option(None, "Score only the first N items of the split.", check=">= 1")
    question: str | None = option(
        None,
        "Ask this instead of the model's own question (a zero-shot prompt); {categories} in it is replaced by "
        "the category list, comma-separated.",
    )
    max_images: int | None = max_images()
    generation: Generation = group(Generation)
    answering: Answering = group(Answering)
    loading: ModelLoading = group(ModelLoading)
    progress: bool = progress()


@dataclass
class ReportArgs(Options):
    """``phivision report``."""

    run: Path | None = option(None, "Training RUN whose eval/<stage>/ outputs to report.")
    predictions: Path | None = option(None, "One predictions.jsonl (instead of --run).")
    out: Path | None = option(
        None, "HTML file to write (default: RUN/report.html, or report.html beside the predictions)."
    )
    resamples: int = option(
        1000, "Bootstrap resamples for the 95% intervals, 0 for none.", check="in [0, 100000]"
    )
    seed: int = seed("Bootstrap seed: the same inputs give the same intervals.")

    def check(self) -> None:
        if (self.run is None) == (self.predictions is None):
            raise PhivisionError("give exactly one of --run or --predictions")


@dataclass
class LoadArgs(Options):
    """:func:`phivision.load_model`."""

    model: str | Path = option(REQUIRED, MODEL, positional=True)
    loading: ModelLoading = group(ModelLoading)
    merge: bool = option(True, "Fold a LoRA adapter into the base weights (faster generation).")


@dataclass
class PredictArgs(Options):
    """``phivision predict``."""

    images: list[Path] = option(
        REQUIRED,
        "Image files and/or directories of images (not recursive), and/or product tables (.csv, .tsv, .jsonl, "
        ".parquet: one product per row, its photos in an image_paths column as a JSON array or paths joined by "
        "|, relative to the table; ids from product_code or id).",
        positional=True,
        argument=True,
    )
    model: str | LoadedModel = option(REQUIRED, MODEL + " In Python also a LoadedModel.", positional=True)
    out: Path | None = option(
        None,
        "JSON-lines file to write (default: stdout; in Python, '-' streams to stdout, None writes nothing).",
    )
    products: bool = option(
        False,
        "Each directory is one product: its image files, sorted by name, are its photos in one prompt; a directory "
        "without image files is a folder of product folders (default: each image is answered alone).",
    )
    max_images: int | None = max_images()
    generation: Generation = group(Generation)
    answering: Answering = group(Answering)
    loading: ModelLoading = group(ModelLoading)
    progress: bool = progress()


@dataclass
class ServeArgs(Options):
    """``phivision serve``."""

    model: str = option(REQUIRED, MODEL, positional=True)
    host: str = option("127.0.0.1", "Interface to bind (0.0.0.0: every interface).")
    port: int = option(8000, "TCP port.", check="in [1, 65535]")
    served_model_name: str | None = option(
        None, "Model id of the OpenAI API (/v1/models). Default: --model as given."
    )
    limits: ServeLimits = group(ServeLimits)
    answering: Answering = group(Answering)
    allow_remote_images: bool = option(
        False,
        "Let chat requests give http(s) image URLs, fetched by the server (public addresses only; never "
        "link-local or cloud metadata addresses).",
    )
    allow_private_image_hosts: bool = option(
        False, "With --allow-remote-images: also fetch from loopback and private networks."
    )
    allowed_host: list[str] | None = option(
        None,
        "A Host name to answer besides the loopback names (repeatable), e.g. the name a reverse proxy forwards. "
        "Bound to loopback, other names are refused (DNS rebinding).",
    )
    loading: ModelLoading = group(ModelLoading)

    def check(self) -> None:
        if self.allow_private_image_hosts and not self.allow_remote_images:
            raise PhivisionError("--allow-private-image-hosts needs --allow-remote-images")


@dataclass
class ExportArgs(Options):
    """``phivision export``."""

    run: Path = option(REQUIRED, "Training RUN directory (LoRA, QLoRA or full fine-tune).", positional=True)
    out: Path = option(
        REQUIRED, "Checkpoint directory to create (must not exist or be empty).", positional=True
    )
    dtype: str | None = option(
        None,
        "dtype of the saved weights: float32, bfloat16 or float16 (default: the base checkpoint's dtype). Each "
        "merged weight is computed in float32 and rounded once; a warning says when bf16 rounding lost more "
        "than 1% of the LoRA update (float32 keeps it exactly).",
        choices=DTYPES,
    )
    max_shard_size: str | int = option(
        MAX_SHARD_SIZE,
        "Largest safetensors shard, e.g. 5GB, 500MB or 5GiB (at least 1MB); 5GB gives the official two files.",
        rule=byte_size,
    )


@dataclass
class DemoArgs(Options):
    """``phivision demo``."""

    out: Path = option(
        Path("phivision-demo"), "Output directory (dataset, tiny checkpoint, run, report).", positional=True
    )
    n: int = option(SAMPLE_N, "Products in the synthetic catalog.", check=f"in [1, {SAMPLE_MAX}]")
    seed: int = seed("Seeds the catalog, the tiny weights and training.")
    config: Path | None = option(None, "Training YAML to use instead of the packaged demo recipe.")
    fresh: bool = option(False, "Delete --out first instead of reusing finished steps.")
    overrides: list[str] | None = option(
        None, "Training overrides as key=value, e.g. schedule.epochs=2.", argument=True
    )
    progress: bool = progress()
