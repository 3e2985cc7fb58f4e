"""``phivision sample``: a synthetic catalog whose images decide the answer (``--like DIR``: shaped like a real
dataset, see :mod:`phivision.data.like`).

Every product is drawn with Pillow from four visible attributes, and its price is a fixed function of them:

    price = BASE[category] x MATERIAL[material] x SIZE[size] x PATTERN[pattern] x noise(+-5%), rounded to 10

* category -> the silhouette (tote, sneaker, shirt, diagonal scarf, hat with brim, watch with dial) and the
  department's studio backdrop colour;
* colour -> the fill colour; pattern -> plain, stripes, checks or dots in white, coarse (4-5 repeats per object);
* material -> a thick trim: none (canvas), brown (leather), gold (silk);
* size -> how much of the canvas the object fills (45%, 68%, 92% of the short side).

The cues are bold on purpose: a tiny model looking at 56 px tiles must be able to learn category and price in
minutes on a CPU. Canvas sizes and aspect ratios vary so the HD crops differ from image to image.

With ``views`` > 1 a product has 1 to ``views`` photos, as catalogs shoot them. A product with one photo is drawn
as above; with more, the cues are spread over the views the way a shoot spreads them:

1. front: the silhouette, colour, pattern and size on a neutral studio backdrop; the trim is not visible, and two
   departments share each front silhouette (a tote and a hat, a sneaker and a watch, a shirt and a scarf look
   alike from the front), so the front alone leaves the category open between two and the material unknown;
2. detail: a close-up of the material (leather or silk trim, canvas weave) on the department's backdrop;
3. back: the department's own silhouette, mirrored, on its backdrop (no trim);
4. packshot: the whole product as a one-photo product is drawn.

So the first photo alone misses what sets part of the price (the material) and half the category, and a model
that reads every photo can get them.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from phivision.args import SAMPLE_N, SAMPLE_VIEWS_MAX, SPLIT, SampleArgs, split_ratios
from phivision.data.layout import (
    CATALOG_FILE,
    IMAGES_DIR,
    REPORT_FILE,
    SPLITS,
    claim_out,
    dataset_identity,
    finish_out,
)
from phivision.data.like import backdrop_of, products_like, profile_dataset, shape_of
from phivision.data.split import assign_splits
from phivision.io import (
    WriteError,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    refuse_overwriting_inputs,
)
from phivision.options import check_option

# category3_code: (category1_code, category2_code, noun in the title, base price in USD)
CATEGORIES = {
    "bags": ("accessories", "bags", "Tote", 900.0),
    "shoes": ("shoes", "sneakers", "Sneaker", 550.0),
    "shirts": ("clothing", "tops", "Shirt", 320.0),
    "scarves": ("accessories", "scarves", "Scarf", 420.0),
    "hats": ("accessories", "hats", "Hat", 260.0),
    "watches": ("accessories", "watches", "Watch", 1800.0),
}
COLORS = {
    "Red": (205, 25, 35),
    "Blue": (25, 65, 200),
    "Green": (20, 140, 55),
    "Grey": (105, 105, 110),
    "Purple": (120, 35, 160),
    "Pink": (230, 70, 150),
}
PATTERNS = {"Plain": 1.0, "Striped": 1.1, "Checked": 1.2, "Dotted": 1.1}
MATERIALS = {"Canvas": (1.0, None), "Leather": (1.6, (100, 55, 15)), "Silk": (2.2, (225, 175, 30))}
SIZES = {"Small": (0.8, 0.45), "Medium": (1.0, 0.68), "Large": (1.3, 0.92)}  # (price factor, canvas fill)
# Each department shoots on its own studio backdrop, so the category shows in every tile, not only in the outline.
BACKDROPS = {
    "bags": (238, 214, 170),
    "shoes": (170, 208, 238),
    "shirts": (188, 232, 176),
    "scarves": (240, 182, 200),
    "hats": (236, 236, 160),
    "watches": (196, 188, 226),
}
PATTERN_INK = (250, 250, 250)
MAX_VIEWS = SAMPLE_VIEWS_MAX  # front, detail, back, packshot
# The front view's silhouette: two departments share each one, so the front alone leaves the category open.
FRONT_SHAPES = {
    "bags": "bags",
    "hats": "bags",
    "shoes": "shoes",
    "watches": "shoes",
    "shirts": "shirts",
    "scarves": "shirts",
}
FRONT_BACKDROP = (232, 232, 228)  # the neutral studio backdrop of every front view
# The detail view's material: leather and silk as their trim colour, canvas as a light weave.
DETAIL_MATERIAL = {
    "Canvas": (214, 200, 168),
    "Leather": MATERIALS["Leather"][1],
    "Silk": MATERIALS["Silk"][1],
}
NOISE = 0.05
BRAND = "Phivision Atelier"

# Silhouettes in a unit box: ("polygon", points) | ("ellipse"/"rectangle", box) | ("chord", box, start, end) |
# ("arc", box, start, end, line width); ("cut", points) removes a region (the shirt's collar).
SHAPES: dict[str, list[tuple]] = {
    "bags": [
        ("polygon", [(0.12, 0.36), (0.88, 0.36), (0.98, 0.98), (0.02, 0.98)]),
        ("arc", (0.26, 0.04, 0.74, 0.68), 180, 360, 0.09),
    ],
    "shoes": [
        (
            "polygon",
            [(0.02, 0.5), (0.42, 0.44), (0.56, 0.16), (0.84, 0.16), (0.9, 0.5), (0.98, 0.64)]
            + [(0.98, 0.84), (0.02, 0.84)],
        ),
    ],
    "shirts": [
        (
            "polygon",
            [(0.36, 0.04), (0.64, 0.04), (0.98, 0.3), (0.86, 0.5), (0.76, 0.42), (0.76, 0.98)]
            + [(0.24, 0.98), (0.24, 0.42), (0.14, 0.5), (0.02, 0.3)],
        ),
        ("cut", [(0.4, 0.04), (0.6, 0.04), (0.5, 0.2)]),
    ],
    "scarves": [("polygon", [(0.0, 0.24), (0.24, 0.0), (1.0, 0.76), (0.76, 1.0)])],
    "hats": [("chord", (0.2, 0.12, 0.8, 1.0), 180, 360), ("ellipse", (0.0, 0.5, 1.0, 0.78))],
    "watches": [("rectangle", (0.36, 0.0, 0.64, 1.0)), ("ellipse", (0.14, 0.22, 0.86, 0.78))],
}


def price_of(category: str, material: str, size: str, pattern: str, noise: float = 1.0) -> float:
    """The catalog price: a deterministic function of what the image shows, times ``noise``, rounded to 10."""
    value = CATEGORIES[category][3] * MATERIALS[material][0] * SIZES[size][0] * PATTERNS[pattern] * noise
    return float(max(10, round(value / 10) * 10))


def title_of(category: str, color: str, pattern: str, material: str, size: str) -> str:
    """E.g. ``Large Red Striped Leather Tote`` (a plain pattern is not named)."""
    words = [size, color, "" if pattern == "Plain" else pattern, material, CATEGORIES[category][2]]
    return " ".join(w for w in words if w)


def _scaled(points: list[tuple[float, float]], side: int) -> list[tuple[float, float]]:
    return [(x * (side - 1), y * (side - 1)) for x, y in points]


def _mask(category: str, side: int) -> Image.Image:
    """The silhouette as an L mask of ``side`` x ``side``."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for kind, *args in SHAPES[category]:
        if kind in ("polygon", "cut"):
            draw.polygon(_scaled(args[0], side), fill=0 if kind == "cut" else 255)
        elif kind == "arc":
            box, start, end, width = args
            draw.arc(_scaled([box[:2], box[2:]], side), start, end, fill=255, width=max(2, int(width * side)))
        elif kind == "chord":
            box, start, end = args
            draw.chord(_scaled([box[:2], box[2:]], side), start, end, fill=255)
        else:
            getattr(draw, kind)(_scaled([args[0][:2], args[0][2:]], side), fill=255)
    return mask


def _fill(color: tuple[int, int, int], pattern: str, side: int) -> Image.Image:
    """The object's colour with a coarse pattern: about four repeats across the object, so it survives 56 px."""
    fill = Image.new("RGB", (side, side), color)
    draw = ImageDraw.Draw(fill)
    period = max(4, side // 4)
    if pattern == "Striped":
        for y in range(0, side, period):
            draw.rectangle((0, y, side, y + period // 2 - 1), fill=PATTERN_INK)
    elif pattern == "Checked":
        for y in range(0, side, period // 2):
            for x in range(0, side, period // 2):
                if (x // (period // 2) + y // (period // 2)) % 2:
                    draw.rectangle((x, y, x + period // 2 - 1, y + period // 2 - 1), fill=PATTERN_INK)
    elif pattern == "Dotted":
        radius = period // 4
        for y in range(period // 2, side, period):
            for x in range(period // 2, side, period):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=PATTERN_INK)
    return fill


def _trim(mask: Image.Image, side: int) -> Image.Image:
    """The inner border of the silhouette (about 13% of its size), computed on an 8x smaller mask for speed."""
    small = mask.reduce(8)
    width = 2 * max(1, side * 15 // 100 // 8) + 1
    eroded = small.filter(ImageFilter.MinFilter(width)).resize(mask.size, Image.Resampling.NEAREST)
    return ImageChops.subtract(mask, eroded)


def draw_product(
    category: str,
    color: str,
    pattern: str,
    material: str,
    size: str,
    canvas: tuple[int, int],
    rng: random.Random,
) -> Image.Image:
    """Draw one product on its department's backdrop, on a canvas of ``canvas`` (width, height)."""
    return draw_shape(category, BACKDROPS[category], color, pattern, material, size, canvas, rng)


def draw_shape(
    shape: str,
    backdrop: tuple[int, int, int],
    color: str,
    pattern: str,
    material: str,
    size: str,
    canvas: tuple[int, int],
    rng: random.Random,
) -> Image.Image:
    """Draw the silhouette ``shape`` (a key of ``SHAPES``) on ``backdrop``: the drawing behind both ``sample``
    and ``sample --like`` (which gives each real category a silhouette and a backdrop of its own)."""
    width, height = canvas
    side = max(16, int(SIZES[size][1] * min(width, height)))
    mask = _mask(shape, side)
    backdrop = tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in backdrop)
    image = Image.new("RGB", canvas, backdrop)
    x = (width - side) // 2 + rng.randint(-(width - side) // 4, (width - side) // 4)
    y = (height - side) // 2 + rng.randint(-(height - side) // 4, (height - side) // 4)
    image.paste(_fill(COLORS[color], pattern, side), (x, y), mask)
    trim = MATERIALS[material][1]
    if trim is not None:
        image.paste(Image.new("RGB", (side, side), trim), (x, y), _trim(mask, side))
    if shape == "watches":  # a white dial with two thick hands
        draw = ImageDraw.Draw(image)
        c, r = (x + side / 2, y + side / 2), side * 0.22
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=(252, 252, 252))
        draw.line((c, (c[0], c[1] - r * 0.8)), fill=(20, 20, 20), width=max(2, side // 30))
        draw.line((c, (c[0] + r * 0.6, c[1])), fill=(20, 20, 20), width=max(2, side // 30))
    return image


def draw_detail(
    backdrop: tuple[int, int, int],
    color: str,
    pattern: str,
    material: str,
    canvas: tuple[int, int],
    rng: random.Random,
) -> Image.Image:
    """A close-up of the material: a broad band of the trim (or of canvas weave) across the product's patterned
    fabric, which fills the frame but for a margin of the department's backdrop."""
    width, height = canvas
    backdrop = tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in backdrop)
    image = Image.new("RGB", canvas, backdrop)
    x, y = width // 10, height // 10
    fabric_w, fabric_h = width - 2 * x, height - 2 * y
    image.paste(
        _fill(COLORS[color], pattern, max(fabric_w, fabric_h)).crop((0, 0, fabric_w, fabric_h)), (x, y)
    )
    band = max(8, fabric_h * 2 // 5)
    top = y + (fabric_h - band) // 2 + rng.randint(-fabric_h // 10, fabric_h // 10)
    draw = ImageDraw.Draw(image)
    draw.rectangle((x, top, x + fabric_w - 1, top + band - 1), fill=DETAIL_MATERIAL[material])
    if material == "Canvas":  # the weave: a coarse grid of darker threads
        step = max(4, band // 5)
        for k in range(x, x + fabric_w, step):
            draw.line((k, top, k, top + band - 1), fill=(170, 155, 120), width=max(1, step // 4))
        for k in range(top, top + band, step):
            draw.line((x, k, x + fabric_w - 1, k), fill=(170, 155, 120), width=max(1, step // 4))
    return image


def draw_views(
    shape: str,
    front_shape: str,
    backdrop: tuple[int, int, int],
    attributes: tuple[str, str, str, str],
    canvases: list[tuple[int, int]],
    rng: random.Random,
) -> list[Image.Image]:
    """The photos of one product, one per canvas: one photo is the whole product (:func:`draw_shape`); more are
    front, detail, back and packshot, then more packshots (see the module docstring). ``attributes``: colour,
    pattern, material, size."""
    color, pattern, material, size = attributes
    if len(canvases) == 1:
        return [draw_shape(shape, backdrop, color, pattern, material, size, canvases[0], rng)]
    views = [
        lambda c: draw_shape(front_shape, FRONT_BACKDROP, color, pattern, "Canvas", size, c, rng),
        lambda c: draw_detail(backdrop, color, pattern, material, c, rng),
        lambda c: ImageOps.mirror(draw_shape(shape, backdrop, color, pattern, "Canvas", size, c, rng)),
        lambda c: draw_shape(shape, backdrop, color, pattern, material, size, c, rng),
    ]
    return [views[min(k, len(views) - 1)](canvas) for k, canvas in enumerate(canvases)]  # 5th on: packshots


def _canvas(rng: random.Random) -> tuple[int, int]:
    """Canvas sizes from 256 to 672 px with aspect ratios from 1:1.8 to 1.8:1."""
    short = rng.randrange(256, 480, 16)
    ratio = rng.choice([1.0, 1.0, 1.25, 1.33, 1.5, 1.8])
    long = min(672, int(short * ratio) // 16 * 16)
    return (long, short) if rng.random() < 0.5 else (short, long)


def sample_products(n: int, seed: int = 0, views: int = 1) -> list[dict]:
    """The attributes, title and price of ``n`` products; categories are balanced, the rest is random. Each
    product has 1 to ``views`` photos (drawn apart from the rest, so the products do not change with ``views``)."""
    rng = random.Random(seed)
    view_rng = random.Random(f"views-{seed}")
    names = list(CATEGORIES)
    products = []
    for i in range(n):
        category = names[i % len(names)]
        color, pattern = rng.choice(list(COLORS)), rng.choice(list(PATTERNS))
        material, size = rng.choice(list(MATERIALS)), rng.choice(list(SIZES))
        cat1, cat2, _, _ = CATEGORIES[category]
        products.append(
            {
                "product_code": f"S{seed}-{i:05d}",
                "title": title_of(category, color, pattern, material, size),
                "category": category,
                "full_price": price_of(category, material, size, pattern, rng.uniform(1 - NOISE, 1 + NOISE)),
                "currency": "USD",
                "brand": BRAND,
                "category1_code": cat1,
                "category2_code": cat2,
                "category3_code": category,
                "color": color,
                "pattern": pattern,
                "material": material,
                "size": size,
                "canvas": _canvas(rng),
                "draw_seed": rng.getrandbits(32),
                "views": view_rng.randint(1, views) if views > 1 else 1,
            }
        )
    return products


def write_sample_catalog(
    out: str | Path,
    n: int = SAMPLE_N,
    seed: int = 0,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    urls_out: str | Path | None = None,
    base_url: str = "http://127.0.0.1:8000",
    overwrite: bool = False,
    views: int = 1,
) -> Path:
    """Write ``n`` synthetic products to ``out`` in the dataset layout and return ``out``. With ``views`` > 1 each
    product has 1 to ``views`` photos (front, detail, back, packshot; see the module docstring).

    With ``urls_out``, also write a CSV in the DBQ schema (prices as text such as ``$1,290.00``) whose
    ``imageurl`` points at ``base_url`` + the image path: serve ``out`` over HTTP (``python -m http.server
    --directory out 8000``) and ``phivision prepare --source urls.csv`` downloads it back.

    ``out`` holding another dataset (another n or seed, or a prepared one) is refused unless ``overwrite``.
    """
    n = check_count(n)
    views = check_views(views)
    if urls_out is not None:
        written = {
            "the catalog in --out": Path(out) / CATALOG_FILE,
            "the report in --out": Path(out) / REPORT_FILE,
        }
        refuse_overwriting_inputs({**written, "--urls-out": urls_out}, [])
    descriptor = f"sample(n={n}, seed={seed})" + (f", views={views}" if views > 1 else "")
    out, build = _claim(out, descriptor, overwrite)
    rows = []
    for product in sample_products(n, seed, views):
        canvas, draw_seed, count = product.pop("canvas"), product.pop("draw_seed"), product.pop("views")
        rng = random.Random(draw_seed)
        category = product["category"]
        attributes = tuple(product[k] for k in ("color", "pattern", "material", "size"))
        canvases = [canvas] + [_canvas(rng) for _ in range(count - 1)]
        images = draw_views(category, FRONT_SHAPES[category], BACKDROPS[category], attributes, canvases, rng)
        product["image_paths"] = _save_images(build, product["product_code"], images)
        rows.append(product)
    catalog = pd.DataFrame(rows)
    catalog.insert(5, "image_path", catalog["image_paths"].map(lambda paths: paths[0]))
    catalog.insert(6, "split", assign_splits(catalog, split, seed=seed))
    catalog.insert(7, "image_paths", catalog.pop("image_paths"))
    _write_dataset(out, build, catalog, descriptor)
    if urls_out is not None:
        table = catalog.drop(columns=["category", "currency", "image_path", "image_paths", "split"]).assign(
            currency_code="USD",
            full_price=catalog["full_price"].map(lambda p: f"${p:,.2f}"),
            imageurl=catalog["image_path"].map(lambda p: f"{base_url.rstrip('/')}/{p}"),
        )
        atomic_write_text(urls_out, table.to_csv(index=False))
    return out


def write_like_catalog(
    out: str | Path,
    like: str | Path,
    n: int | None = None,
    seed: int = 0,
    split: tuple[float, float, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic catalog shaped like the dataset ``like`` (see :mod:`phivision.data.like`): its
    categories and proportions, per-category prices, title patterns, photos per product, image sizes and split
    ratios, but not one of its titles or images. ``n`` defaults to the size of ``like``, ``split`` to its
    ratios."""
    profile = profile_dataset(like)
    n = check_count(sum(c.rows for c in profile.categories.values()) if n is None else n)
    ratios = split if split is not None else profile.split_ratios
    descriptor = f"sample(n={n}, seed={seed}, like={Path(like).resolve()})"
    out, build = _claim(out, descriptor, overwrite)
    rng = random.Random(seed)
    names, shapes = list(profile.categories), list(SHAPES)
    rows = []
    for i, product in enumerate(products_like(profile, n, seed)):
        u, canvases = product.pop("quantile"), product.pop("canvases")
        size = "Small" if u < 1 / 3 else "Medium" if u < 2 / 3 else "Large"  # pricier products look bigger
        category = product["category"]
        index = shape_of(category, names)
        attributes = (rng.choice(list(COLORS)), rng.choice(list(PATTERNS)), rng.choice(list(MATERIALS)), size)
        images = draw_views(
            shapes[index % len(shapes)],
            shapes[index // 2 * 2 % len(shapes)],  # pairs of departments share a front silhouette
            backdrop_of(category),
            attributes,
            canvases,
            random.Random(rng.getrandbits(32)),
        )
        code = f"L{seed}-{i:05d}"
        rows.append({"product_code": code, **product, "image_paths": _save_images(build, code, images)})
    catalog = pd.DataFrame(rows)[
        ["product_code", "title", "category", "full_price", "currency", "image_paths"]
    ]
    catalog.insert(5, "image_path", catalog["image_paths"].map(lambda paths: paths[0]))
    catalog.insert(6, "split", assign_splits(catalog, ratios, seed=seed))
    catalog.insert(7, "image_paths", catalog.pop("image_paths"))
    catalog["brand"] = "Synthetic"
    _write_dataset(out, build, catalog, descriptor, {"like": profile.as_dict()})
    return out


def sample(args: SampleArgs) -> Path:
    """``phivision sample`` (:class:`SampleArgs`, validated). ``n`` defaults to 600, or with ``like`` to the size
    of that dataset; ``split`` to 0.8,0.1,0.1, or with ``like`` to that dataset's ratios; ``views``: the most
    photos per product (with ``like``, the photos per product are that dataset's)."""
    if args.like is not None:
        ratios = split_ratios(args.split) if args.split is not None else None
        return write_like_catalog(
            args.out, args.like, n=args.n, seed=args.seed, split=ratios, overwrite=args.overwrite
        )
    return write_sample_catalog(
        args.out,
        n=SAMPLE_N if args.n is None else args.n,
        seed=args.seed,
        split=split_ratios(args.split if args.split is not None else SPLIT),
        urls_out=args.urls_out,
        base_url=args.base_url,
        overwrite=args.overwrite,
        views=args.views,
    )


def check_count(n: object) -> int:
    """``n`` as a plain int, checked as ``--n`` is (numpy integers are fine, bools are not)."""
    return check_option(SampleArgs, "n", n)


def check_views(views: object) -> int:
    """``views`` as a plain int, checked as ``--views`` is (1 to :data:`MAX_VIEWS`)."""
    return check_option(SampleArgs, "views", views)


def _claim(out: str | Path, descriptor: str, overwrite: bool) -> tuple[Path, Path]:
    """Refuse another dataset in ``out``, then mark the directory the dataset is built in (``out``, or beside
    the dataset ``overwrite`` replaces) as this one before the first image is drawn, so a killed run is
    recognised (and redone) by the same command. Returns ``out`` and that directory."""
    out = Path(out)
    identity = dataset_identity("sample", [descriptor])
    build = claim_out(out, identity, [descriptor], overwrite)
    if not (build / REPORT_FILE).exists():
        atomic_write_json(
            build / REPORT_FILE,
            {"dataset": identity, "status": "drawing", "sources": [{"source": descriptor}]},
        )
    (build / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    return out, build


def _save_images(out: Path, code: str, images: list[Image.Image]) -> list[str]:
    """Save as JPEG (``CODE.jpg``, then ``CODE-2.jpg``...); plain writes, because the catalog is written last
    (atomically), so a killed run leaves no dataset to misread, and a rerun writes the same bytes again."""
    paths = []
    for k, image in enumerate(images, start=1):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        rel = f"{IMAGES_DIR}/{code}.jpg" if k == 1 else f"{IMAGES_DIR}/{code}-{k}.jpg"
        try:
            (out / rel).write_bytes(buffer.getvalue())
        except OSError as err:
            raise WriteError(out / rel, err) from None
        paths.append(rel)
    return paths


def _write_dataset(
    out: Path, build: Path, catalog: pd.DataFrame, descriptor: str, extra: dict | None = None
) -> None:
    """Catalog and report into ``build``, then the finished dataset swapped into ``out``."""
    atomic_write_parquet(build / CATALOG_FILE, catalog)
    n = len(catalog)
    report = {
        "dataset": dataset_identity("sample", [descriptor]),
        "status": "done",
        "sources": [{"source": descriptor, "rows": n, "kept": n}],
        "out": str(out),
        "counts": {"rows": n, "kept": n, "dropped": 0},
        "dropped_by_reason": {},
        "failed": [],
        "splits": {s: int((catalog["split"] == s).sum()) for s in SPLITS},
        "categories": {str(k): int(v) for k, v in catalog["category"].value_counts().sort_index().items()},
        **(extra or {}),
    }
    atomic_write_json(build / REPORT_FILE, report)
    finish_out(out, build)
