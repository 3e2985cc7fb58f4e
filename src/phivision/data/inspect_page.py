"""The page of ``phivision inspect``: plots (matplotlib, embedded as PNG), tables and thumbnails in one
self-contained HTML file with no script and no outside request."""

from __future__ import annotations

import datetime
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from phivision.data.layout import SPLITS
from phivision.data.pages import figure_uri, thumbnail_uri

SPLIT_COLORS = {"train": "#2563eb", "val": "#f59e0b", "test": "#10b981"}
SHOWN = 24  # examples listed in the HTML per finding (the JSON has counts and more examples)
THUMBNAIL_PX = 96


def render_page(
    result: dict, frame: pd.DataFrame, directory: Path, photos: pd.DataFrame | None = None
) -> str:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("phivision.data", "templates"),
        autoescape=True,
        keep_trailing_newline=True,
    )
    template = environment.get_template("inspect.html.jinja")
    return template.render(
        r=result,
        splits=SPLITS,
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        plots=_plots(result, frame, frame if photos is None else photos),
        pairs=_pair_thumbnails(result, frame, directory),
        shared=_shared_thumbnails(result, directory),
        shown=SHOWN,
    )


# ------------------------------------------------------------------------------------------------ plots


def _plots(result: dict, frame: pd.DataFrame, photos: pd.DataFrame) -> dict:
    plots = {"splits": _split_plot(result), "prices": _price_plots(frame)}
    good = photos[photos["_ok"]].drop_duplicates("image_path")
    if len(good):
        plots["sizes"] = _size_plot(good)
    return plots


def _split_plot(result: dict) -> str:
    table = result["splits"]["by_category"]
    names = sorted(table, key=lambda c: sum(table[c].values()))
    height = max(2.5, 0.32 * len(names) + 1.2)
    figure = Figure(figsize=(7.5, min(height, 40)))
    axis = figure.subplots()
    left = np.zeros(len(names))
    for split in SPLITS:
        values = np.array([table[c][split] for c in names])
        axis.barh(names, values, left=left, color=SPLIT_COLORS[split], label=split)
        left += values
    axis.set_xlabel("rows")
    axis.set_title("rows per category and split")
    axis.legend(loc="lower right")
    axis.tick_params(axis="y", labelsize=8 if len(names) > 20 else 10)
    return figure_uri(figure)


def _price_plots(frame: pd.DataFrame) -> list[dict]:
    """One box plot per currency: the price distribution of each category, on a log axis."""
    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    sideways = {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}
    plots = []
    for currency, rows in frame.groupby("currency", sort=True):
        groups = rows.groupby("category")["full_price"]
        names = sorted(groups.groups, key=lambda c: groups.get_group(c).median())
        height = max(2.5, 0.32 * len(names) + 1.2)
        figure = Figure(figsize=(7.5, min(height, 40)))
        axis = figure.subplots()
        axis.boxplot(
            [groups.get_group(c).to_numpy() for c in names],
            showfliers=True,
            flierprops={"markersize": 3},
            **sideways,
        )
        axis.set_yticks(range(1, len(names) + 1), [str(c) for c in names])
        axis.set_xscale("log")
        _price_ticks(axis.xaxis)
        axis.set_xlabel(f"full price ({currency}, log scale)")
        axis.set_title(f"price per category, {currency}")
        axis.tick_params(axis="y", labelsize=8 if len(names) > 20 else 10)
        plots.append({"currency": str(currency), "src": figure_uri(figure)})
    return plots


def _price_ticks(axis) -> None:
    """Plain numbers (1, 2, 5 per decade) and no minor labels, so tick labels never run into each other."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.10g}"))
    axis.set_minor_formatter(NullFormatter())


def _size_plot(good: pd.DataFrame) -> str:
    figure = Figure(figsize=(11, 4))
    sizes, aspects = figure.subplots(1, 2)
    files = good.drop_duplicates("image_path")
    for split in SPLITS:
        part = files[files["split"] == split]
        sizes.scatter(part["_width"], part["_height"], s=8, alpha=0.5, color=SPLIT_COLORS[split], label=split)
    sizes.set_xlabel("width (px)")
    sizes.set_ylabel("height (px)")
    sizes.set_title("image sizes")
    sizes.legend(loc="upper left")
    ratio = np.log2((files["_width"] / files["_height"]).to_numpy(dtype=float))
    aspects.hist(ratio, bins=40, color="#6b7280")
    ticks = [t for t in (-3, -2, -1, 0, 1, 2, 3) if ratio.min() - 0.5 <= t <= ratio.max() + 0.5] or [0]
    aspects.set_xticks(ticks, [f"{2.0**t:g}" for t in ticks])
    aspects.set_xlabel("aspect ratio, width / height (log scale)")
    aspects.set_ylabel("images")
    aspects.set_title("aspect ratios")
    return figure_uri(figure)


# ------------------------------------------------------------------------------------------------ thumbnails


def _pair_thumbnails(result: dict, frame: pd.DataFrame, directory: Path) -> list[dict]:
    pairs = []
    for example in result["near_duplicates"]["examples"][:SHOWN]:
        sides = []
        for row in example["rows"]:
            item = frame.iloc[row - 2]
            sides.append(
                {
                    "row": row,
                    "split": item["split"],
                    "title": item["title"],
                    "src": thumbnail_uri(directory / item["image_path"], THUMBNAIL_PX),
                }
            )
        pairs.append({"bits": example["bits"], "same_file": example["same_file"], "sides": sides})
    return pairs


def _shared_thumbnails(result: dict, directory: Path) -> list[dict]:
    return [
        {**item, "src": thumbnail_uri(directory / item["image_path"], THUMBNAIL_PX)}
        for item in result["placeholders"]["shared_examples"][:SHOWN]
    ]
