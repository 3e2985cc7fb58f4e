"""``phivision sample --like DIR``: the shape of a real dataset without its content.

:func:`profile_dataset` measures a dataset: its categories and their proportions, each category's price
distribution (and the step prices are rounded to), the length and word patterns of its titles, how often
titles repeat (colour variants), its image sizes and aspect ratios, its split ratios and currencies.
:func:`products_like` draws synthetic products from that profile:

* categories keep their names and proportions (largest-remainder rounding, so within 1/n);
* prices follow each category's quantile function (stratified draws through the interpolated quantiles of the
  log prices, rounded to the dataset's price step), so medians and spreads match;
* titles are made of invented words: every real word is replaced by a new one of the same shape (length,
  capitals, digits, punctuation) ranked the same in its category's vocabulary, and titles are drawn word by word
  from those ranks, so title lengths, vocabulary size, word frequencies and the last-word pattern (``... Tote``)
  carry over; a title equal to a real one (compared case- and punctuation-insensitively) is never kept;
* each product has as many photos as a real product drawn at random (the photos-per-product distribution), and
  canvases are real sizes jittered by up to 8%, with drawn products (never a real image).

The profile itself (``Profile.as_dict``) holds no title and no image: only counts, quantiles and shapes.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phivision.data.images import ImageError, image_size
from phivision.data.layout import SPLITS, load_catalog
from phivision.data.split import group_key
from phivision.errors import PhivisionError

PRICE_STEPS = (1000.0, 500.0, 100.0, 50.0, 10.0, 5.0, 1.0, 0.5, 0.1, 0.05, 0.01)
VOWELS, CONSONANTS = "aeiou", "bcdfghklmnprstvz"
JITTER = 0.08  # canvas sizes are real sizes times 1 +- this


@dataclass
class CategoryProfile:
    rows: int
    log_prices: list[float]  # sorted
    currency: str
    word_counts: Counter  # words per title -> titles
    group_sizes: list[int]  # rows per distinct (normalised) title: colour variants share one
    last_words: list[tuple[str, int]]  # (invented word, frequency), most frequent first
    other_words: list[tuple[str, int]]


@dataclass
class Profile:
    """What ``sample --like`` copies from a dataset (see the module docstring)."""

    source: str
    categories: dict[str, CategoryProfile]
    price_step: float
    variant_share: float  # fraction of rows whose title another row of the category repeats (for the report)
    sizes: list[tuple[int, int]]  # (width, height) of the images that could be read
    split_ratios: tuple[float, float, float]
    photos_per_product: dict[int, int] = field(default_factory=lambda: {1: 1})  # photos -> products
    real_title_keys: set[str] = field(repr=False, default_factory=set)
    real_words: set[str] = field(repr=False, default_factory=set)

    def as_dict(self) -> dict:
        """The measured shape, for the report (no title, no word, no image)."""
        return {
            "source": self.source,
            "categories": {k: c.rows for k, c in self.categories.items()},
            "price_step": self.price_step,
            "variant_share": round(self.variant_share, 4),
            "images_measured": len(self.sizes),
            "photos_per_product": {str(k): v for k, v in sorted(self.photos_per_product.items())},
            "split_ratios": [round(r, 4) for r in self.split_ratios],
        }


def profile_dataset(directory: str | Path) -> Profile:
    """Measure a dataset in the layout (``load_catalog`` checks it; unreadable images are skipped)."""
    directory = Path(directory)
    catalog = load_catalog(directory, check_images=False)
    real_words = {w.lower() for t in catalog["title"] for w in t.split()}
    rng = random.Random(0)
    invented: dict[str, str] = {}
    categories = {}
    for name, rows in catalog.groupby("category", sort=True):
        words = [t.split() for t in rows["title"]]
        categories[str(name)] = CategoryProfile(
            rows=len(rows),
            log_prices=sorted(math.log(p) for p in rows["full_price"]),
            currency=rows["currency"].mode().iloc[0],
            word_counts=Counter(len(w) for w in words),
            group_sizes=sorted(rows["title"].map(group_key).value_counts().tolist()),
            last_words=_invent(Counter(w[-1] for w in words if w), invented, real_words, rng),
            other_words=_invent(Counter(x for w in words for x in w[:-1]), invented, real_words, rng),
        )
    keys = catalog["title"].map(group_key)
    repeated = keys.groupby([catalog["category"], keys]).transform("size") > 1
    split_counts = catalog["split"].value_counts()
    ratios = tuple(float(split_counts.get(s, 0)) / len(catalog) for s in SPLITS)
    return Profile(
        source=str(directory),
        categories=categories,
        price_step=price_step(catalog["full_price"].to_numpy()),
        variant_share=float(repeated.mean()),
        sizes=_image_sizes(directory, [p for paths in catalog["image_paths"] for p in paths]),
        split_ratios=ratios,
        photos_per_product=dict(Counter(len(paths) for paths in catalog["image_paths"])),
        real_title_keys=set(keys),
        real_words=real_words,
    )


def price_step(prices: np.ndarray) -> float:
    """The coarsest step that at least 90% of the prices are multiples of (1290 -> 10, 12.99 -> 0.01)."""
    for step in PRICE_STEPS:
        multiples = np.abs(prices / step - np.round(prices / step)) < 1e-6
        if multiples.mean() >= 0.9:
            return step
    return 0.01


def _image_sizes(directory: Path, paths) -> list[tuple[int, int]]:
    """Sizes from the headers (no pixels decoded); a file that is not a readable image is skipped."""
    sizes = []
    for rel in paths:
        try:
            sizes.append(image_size(directory / rel))
        except ImageError:
            continue
    return sizes


def _invent(
    counts: Counter, invented: dict[str, str], real_words: set[str], rng: random.Random
) -> list[tuple[str, int]]:
    """Each real word -> an invented word of the same shape (one mapping for the whole dataset), with the real
    word's frequency; most frequent first."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    out = []
    for word, count in ranked:
        if word not in invented:
            invented[word] = invent_word(word, real_words, set(invented.values()), rng)
        out.append((invented[word], count))
    return out


def invent_word(word: str, avoid: set[str], taken: set[str], rng: random.Random) -> str:
    """A new word shaped like ``word``: letters alternate consonant and vowel with the same capitals, digits
    become other digits, punctuation stays. Never one of ``avoid`` (lower-cased real words) or ``taken``."""
    for attempt in range(50):
        letters = [ch for ch in word if ch.isalpha()]
        vowel_first = rng.random() < 0.3
        made, k = [], 0
        for ch in word:
            if ch.isalpha():
                pool = VOWELS if (k % 2 == 0) == vowel_first else CONSONANTS
                new = rng.choice(pool)
                made.append(new.upper() if ch.isupper() else new)
                k += 1
            elif ch.isdigit():
                made.append(str(rng.randrange(10)))
            else:
                made.append(ch)
        if not letters and not any(ch.isdigit() for ch in word):
            return word  # punctuation only ("-", "&"): no content to hide
        new_word = "".join(made)
        if attempt > 20:
            new_word += rng.choice(CONSONANTS)
        if new_word.lower() not in avoid and new_word not in taken:
            return new_word
    raise PhivisionError(f"cannot invent a word shaped like {word!r}")  # not reached with real vocabularies


def allocate(counts: dict[str, int], n: int) -> dict[str, int]:
    """``n`` split over the categories in proportion to ``counts`` (largest remainder: within 1 of exact)."""
    total = sum(counts.values())
    exact = {k: n * v / total for k, v in counts.items()}
    share = {k: int(math.floor(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (-(exact[k] - share[k]), k))[: n - sum(share.values())]:
        share[k] += 1
    return share


def products_like(profile: Profile, n: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic products shaped like ``profile``: category, title, price, currency, one canvas per photo
    and the price quantile (which the drawing turns into the product's size, so the price stays visible). Titles
    come in groups whose sizes are drawn from the category's real title groups (colour variants), so the split,
    which keeps a group together, behaves as on the real data. Photo counts are drawn from their own stream, so
    a one-photo profile gives the products it always gave."""
    rng = random.Random(seed)
    photo_rng = random.Random(f"photos-{seed}")
    counts, weights = zip(*sorted(profile.photos_per_product.items()), strict=True)
    products: list[dict] = []
    shares = allocate({k: c.rows for k, c in profile.categories.items()}, n)
    for name, count in shares.items():
        category = profile.categories[name]
        quantiles = [(j + rng.random()) / count for j in range(count)]
        rng.shuffle(quantiles)
        titles: list[str] = []
        while len(titles) < count:
            titles += [_new_title(category, profile, rng)] * rng.choice(category.group_sizes)
        for title, u in zip(titles[:count], quantiles, strict=True):
            products.append(
                {
                    "category": name,
                    "title": title,
                    "full_price": _price_at(category.log_prices, u, profile.price_step),
                    "currency": category.currency,
                    "canvases": [_canvas(profile.sizes, rng)]
                    + [
                        _canvas(profile.sizes, photo_rng)
                        for _ in range(_photos(counts, weights, photo_rng) - 1)
                    ],
                    "quantile": u,
                }
            )
    rng.shuffle(products)
    return products


def _photos(counts: tuple[int, ...], weights: tuple[int, ...], rng: random.Random) -> int:
    return counts[0] if len(counts) == 1 else rng.choices(counts, weights)[0]


def _price_at(log_prices: list[float], u: float, step: float) -> float:
    """The price at quantile ``u`` of the category (linear between order statistics, on the log scale)."""
    positions = np.linspace(0.0, 1.0, len(log_prices)) if len(log_prices) > 1 else np.array([0.5])
    value = math.exp(float(np.interp(u, positions, log_prices)))
    return float(max(step, round(value / step) * step))


def _new_title(category: CategoryProfile, profile: Profile, rng: random.Random) -> str:
    lengths, weights = zip(*category.word_counts.items(), strict=True)
    for _ in range(20):
        size = rng.choices(lengths, weights)[0]
        words = [_pick(category.other_words or category.last_words, rng) for _ in range(size - 1)]
        words.append(_pick(category.last_words or category.other_words, rng))
        title = " ".join(words)
        if group_key(title) not in profile.real_title_keys:
            return title
    return title + " " + invent_word("Xxxx", profile.real_words, set(), rng)


def _pick(words: list[tuple[str, int]], rng: random.Random) -> str:
    return rng.choices([w for w, _ in words], [c for _, c in words])[0]


def _canvas(sizes: list[tuple[int, int]], rng: random.Random) -> tuple[int, int]:
    if not sizes:
        return (rng.randrange(256, 640, 16), rng.randrange(256, 640, 16))
    width, height = rng.choice(sizes)
    return (
        max(16, round(width * (1 + rng.uniform(-JITTER, JITTER)))),
        max(16, round(height * (1 + rng.uniform(-JITTER, JITTER)))),
    )


def backdrop_of(category: str) -> tuple[int, int, int]:
    """A light studio backdrop colour that names the category (stable across runs)."""
    h = zlib.crc32(category.encode("utf-8"))
    return (150 + h % 100, 150 + (h >> 8) % 100, 150 + (h >> 16) % 100)


def shape_of(category: str, names: list[str]) -> int:
    """Index of the silhouette for ``category``: categories in sorted order take the silhouettes in turn."""
    return sorted(names).index(category)
