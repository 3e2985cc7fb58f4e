"""The report's figures, drawn with matplotlib's Agg canvas and returned as base64 PNG data URIs.

Prices are drawn on log axes labelled with the catalog's currency, with readable tick labels (1, 10, 100, 1k,
...); price errors are in percent. :func:`overlapping_labels` measures, on the rendered figure, whether any two
labels collide. :func:`to_data_uri` tidies every figure before encoding it: an x tick label that runs into a y
tick label where the axes meet is hidden, and an axis whose labels still collide is thinned (a safety net: the
tests check the figures with the corner rule alone, without thinning).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from phivision.data.pages import figure_uri
from phivision.evaluate.metrics import normalize_label

CONFUSION_MAX = 15  # categories shown in the confusion matrix; the rest are pooled in "(other)"
LABEL_CHARS = 24  # category names are cut to this many characters on axes
ERROR_RANGE = (-100, 300)  # percent error shown in the histogram; larger errors pile up in the last bin
BLUE, GREEN, GREY, ORANGE, RED = "#2563eb", "#16a34a", "#9ca3af", "#ea580c", "#b91c1c"
DPI = 100


# ------------------------------------------------------------------------------------------ encoding


def overlapping_labels(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of visible labels (tick labels, axis labels, titles) whose drawn outlines overlap.

    Rotated labels are measured as rotated rectangles, not by their axis-aligned boxes, which would make
    neighbouring 45-degree labels collide when they do not.
    """
    return _overlapping(_measure(fig))


def tidy_labels(fig: Figure, thin: bool = True) -> list[tuple[str, str]]:
    """Draw the figure once and fix what collides; returns the pairs of labels that still overlap.

    Where the axes meet, an x tick label that runs into a y tick label is hidden (the y label stays). With
    ``thin``, an axis whose labels still collide shows only every other one, up to three times over.
    Hiding labels moves nothing, so one drawing serves every check.
    """
    outlines = _measure(fig)
    for ax in fig.axes:
        ys = [outlines[t] for t in drawn_tick_labels(ax.yaxis)]
        for label in drawn_tick_labels(ax.xaxis):
            if any(_overlap(outlines[label], y) for y in ys):
                label.set_visible(False)
    for _ in range(3 if thin else 0):
        clashes = {text for pair in _overlapping(outlines, texts=True) for text in pair}
        if not clashes:
            break
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels = drawn_tick_labels(axis)
                if any(t in clashes for t in labels):
                    for label in labels[1::2]:
                        label.set_visible(False)
    return _overlapping(outlines)


def _measure(fig: Figure) -> dict[Text, np.ndarray]:
    """Draw the figure and return the outline of every label it shows."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    return {t: _outline(t, renderer) for t in _labels(fig) if t.get_visible() and t.get_text().strip()}


def _overlapping(outlines: dict[Text, np.ndarray], texts: bool = False) -> list:
    shown = [t for t in outlines if t.get_visible()]
    found = []
    for i in range(len(shown)):
        for j in range(i + 1, len(shown)):
            if _overlap(outlines[shown[i]], outlines[shown[j]]):
                found.append((shown[i], shown[j]) if texts else (shown[i].get_text(), shown[j].get_text()))
    return found


def drawn_tick_labels(axis) -> list[Text]:
    """The major tick labels a drawn axis shows: visible, not empty, at a tick inside the view limits."""
    transform = axis.get_transform()
    low, high = sorted(transform.transform(np.asarray(axis.get_view_interval(), dtype=float)))
    slack = 1e-9 * max(1.0, abs(high - low))
    shown = []
    for tick in axis.get_major_ticks():
        where = float(transform.transform(np.array([tick.get_loc()], dtype=float))[0])
        if (
            low - slack <= where <= high + slack
            and tick.label1.get_visible()
            and tick.label1.get_text().strip()
        ):
            shown.append(tick.label1)
    return shown


def _labels(fig: Figure) -> list[Text]:
    texts: list[Text] = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts += drawn_tick_labels(axis)
            texts.append(axis.label)
        texts.append(ax.title)
    return texts


def _outline(text: Text, renderer) -> np.ndarray:
    """The four corners (display pixels) of the rectangle the text is drawn in, rotation included."""
    box = text.get_window_extent(renderer)
    angle = math.radians(text.get_rotation())
    if abs(math.sin(angle)) < 1e-6 or abs(math.cos(angle)) < 1e-6:
        return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    width, height, _ = renderer.get_text_width_height_descent(
        text.get_text(), text.get_fontproperties(), False
    )
    center = np.array(
        [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]
    )  # a rotated box is centered in its bounds
    along = np.array([math.cos(angle), math.sin(angle)]) * width / 2
    across = np.array([-math.sin(angle), math.cos(angle)]) * height / 2
    return np.array(
        [center - along - across, center + along - across, center + along + across, center - along + across]
    )


def _overlap(a: np.ndarray, b: np.ndarray, tolerance: float = 0.5) -> bool:
    """Whether two convex outlines overlap by more than ``tolerance`` pixels (separating axis test)."""
    for outline in (a, b):
        for k in range(len(outline)):
            edge = outline[(k + 1) % len(outline)] - outline[k]
            normal = np.array([-edge[1], edge[0]]) / (np.hypot(*edge) or 1.0)
            pa, pb = a @ normal, b @ normal
            if min(pa.max(), pb.max()) - max(pa.min(), pb.min()) <= tolerance:
                return False
    return True


def to_data_uri(fig: Figure) -> str:
    """The figure as a PNG data URI, its labels tidied first (:func:`tidy_labels`)."""
    tidy_labels(fig)
    return figure_uri(fig, dpi=DPI)


# ------------------------------------------------------------------------------------------- axes


def short_number(value: float) -> str:
    """1 -> "1", 2500 -> "2.5k", 3e6 -> "3M", 0.05 -> "0.05": tick labels that stay short."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def price_axis(axis, low: float, high: float) -> None:
    """Log-scale price ticks that always show a few labels: decades, 1-2-5 steps, or plain steps on a short range."""
    decades = math.log10(high / low)
    if decades > 2.2:  # one label per decade (every other one past 7 decades)
        locator = ticker.LogLocator(base=10, numticks=8)
    elif decades >= 0.8:  # 1, 2, 5, 10, 20, 50...: at most 7 labels
        locator = ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12)
    else:  # less than a decade: evenly spaced round numbers
        locator = ticker.MaxNLocator(nbins=4)
    axis.set_major_locator(locator)
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: short_number(v)))
    axis.set_minor_locator(ticker.NullLocator())


def percent_axis(axis, signed: bool = False) -> None:
    fmt = "{:+.0f}%" if signed else "{:.0f}%"
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: fmt.format(v).replace("+0%", "0%")))


def currency_label(text: str, currency: str | None) -> str:
    return f"{text} ({plain(currency)})" if currency else f"{text} (currency unknown)"


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=GREY)
    ax.set_xticks([])
    ax.set_yticks([])


# -------------------------------------------------------------------------------------------- price


def price_scatter(records: Sequence[dict], currency: str | None) -> Figure:
    """Predicted against true price on log-log axes, with the line of perfect answers and the 10% band."""
    pairs = [(r["truth"]["price"], r["parsed"]["price"]) for r in records if r["parsed"]["price"] is not None]
    fig = Figure(figsize=(5.4, 4.8))
    ax = fig.add_subplot()
    if pairs:
        true, pred = np.array(pairs).T
        low, high = min(true.min(), pred.min()) / 1.5, max(true.max(), pred.max()) * 1.5
        ax.fill_between(
            [low, high], [low * 0.9, high * 0.9], [low * 1.1, high * 1.1], color=GREEN, alpha=0.15
        )
        ax.plot([low, high], [low, high], color=GREY, lw=1, ls="--", label="perfect (band: within 10%)")
        ax.scatter(true, pred, s=14, alpha=0.6, color=BLUE, edgecolors="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        price_axis(ax.xaxis, low, high)
        price_axis(ax.yaxis, low, high)
        ax.legend(loc="upper left", frameon=False, fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    else:
        _empty(ax, "no answer had a readable price")
    missing = len(records) - len(pairs)
    shown = f"{missing} without a price not shown" if missing else "every answer had a price"
    ax.set_title(f"predicted vs true price ({shown})", fontsize=10)
    ax.set_xlabel(currency_label("true price", currency))
    ax.set_ylabel(currency_label("predicted price", currency))
    return fig


def error_histogram(records: Sequence[dict]) -> Figure:
    """Signed price error in percent, (predicted - true) / true; errors past the range pile up at its end."""
    errors = np.array(
        [
            100 * (r["parsed"]["price"] - r["truth"]["price"]) / r["truth"]["price"]
            for r in records
            if r["parsed"]["price"] is not None
        ]
    )
    low, high = ERROR_RANGE
    fig = Figure(figsize=(5.4, 4.8))
    ax = fig.add_subplot()
    if errors.size:
        over = int((errors > high).sum())
        ax.hist(np.clip(errors, low, high), bins=np.arange(low, high + 10, 10), color=BLUE, alpha=0.85)
        ax.axvspan(-10, 10, color=GREEN, alpha=0.15, label="within 10%")
        ax.axvline(0, color="#111827", lw=1)
        ax.set_xlim(low - 5, high + 10)
        ax.xaxis.set_major_locator(ticker.MultipleLocator(100))
        percent_axis(ax.xaxis, signed=True)
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.legend(loc="upper right", frameon=False, fontsize=8)
        if over:
            ax.annotate(
                f"{over} at +{high}% or more",
                (high, 0),
                xytext=(-4, 30),
                textcoords="offset points",
                ha="right",
                fontsize=8,
                color=ORANGE,
                arrowprops={"arrowstyle": "->", "color": ORANGE},
            )
    else:
        _empty(ax, "no answer had a readable price")
    missing = len(records) - errors.size
    shown = f"; {missing} without a price" if missing else ""
    ax.set_title(f"price error, (predicted - true) / true{shown}", fontsize=10)
    ax.set_xlabel("price error (0% = exact, -50% = half, +100% = double)")
    ax.set_ylabel("items")
    return fig


# ----------------------------------------------------------------------------------------- category


def confusion_matrix(records: Sequence[dict]) -> Figure:
    """Counts of true (rows) against predicted (columns) category; the rarest classes are pooled in (other)."""
    names: dict[str, str] = {}
    for r in records:
        names.setdefault(normalize_label(r["truth"]["category"]), r["truth"]["category"])
    counts = Counter(normalize_label(r["truth"]["category"]) for r in records)
    top = sorted(counts, key=lambda c: (-counts[c], c))[:CONFUSION_MAX]
    rows = [*top, "(other)"] if len(counts) > len(top) else top
    cols = [*top, "(other)", "(none)"]

    def bucket(label: str | None) -> str:
        if label is None:
            return "(none)"
        label = normalize_label(label)
        return label if label in top else "(other)"

    grid = np.zeros((len(rows), len(cols)), dtype=int)
    for r in records:
        grid[rows.index(bucket(r["truth"]["category"])), cols.index(bucket(r["parsed"]["category"]))] += 1
    keep = [j for j, c in enumerate(cols) if c in top or grid[:, j].any()]
    cols, grid = [cols[j] for j in keep], grid[:, keep]
    size = 3.2 + 0.36 * max(len(rows), len(cols))
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="Blues", aspect="auto")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    top_value = grid.max() or 1
    for (i, j), value in np.ndenumerate(grid):
        if value:
            color = "white" if value > top_value / 2 else "#111827"
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(
        range(len(cols)), [_cut(names.get(c, c)) for c in cols], rotation=45, ha="right", fontsize=8
    )
    ax.set_yticks(range(len(rows)), [_cut(names.get(c, c)) for c in rows], fontsize=8)
    ax.set_xlabel("predicted category")
    ax.set_ylabel("true category")
    ax.set_title("category confusion matrix (items)", fontsize=10)
    return fig


def _cut(name: str) -> str:
    """Long names keep their start and end (where "Leather Shoulder Bags" and "Leather Tote Bags" differ);
    a "$" is shown as itself, never read as the start of matplotlib math."""
    if len(name) > LABEL_CHARS:
        head = (LABEL_CHARS - 1) // 2
        name = name[:head].rstrip() + "…" + name[-(LABEL_CHARS - 1 - head) :].lstrip()
    return plain(name)


def plain(text: str) -> str:
    """Text from the data as matplotlib should print it: a "$" is a dollar sign, not the start of math."""
    return text.replace("$", r"\$")


# ----------------------------------------------------------------------------------------- training


def _steps_axis(ax: Axes, last_step: int | None = None) -> None:
    """Optimizer steps from 0 to the run's last step, so every training plot shares one x scale."""
    if last_step:
        ax.set_xlim(0, last_step * 1.03)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: short_number(v)))
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)


def last_step(*logs: Sequence[dict]) -> int | None:
    steps = [r["step"] for log in logs for r in log]
    return max(steps) if steps else None


def loss_curve(train: Sequence[dict], evals: Sequence[dict], best_step: int | None) -> Figure:
    """Train loss (per logging window) and validation loss by step."""
    fig = Figure(figsize=(5.4, 3.8))
    ax = fig.add_subplot()
    points = [(r["step"], r["loss"]) for r in train if "loss" in r]
    checks = [(r["step"], r["val_loss"]) for r in evals if "val_loss" in r]
    if points:
        ax.plot(*zip(*points, strict=True), color=BLUE, lw=1.2, label="train loss")
    if checks:
        ax.plot(*zip(*checks, strict=True), color=ORANGE, marker="o", ms=4, lw=1.2, label="validation loss")
    if best_step is not None and (points or checks):
        ax.axvline(best_step, color=GREEN, lw=1, ls=":", label=f"best evaluation (step {best_step})")
    if not (points or checks):
        _empty(ax, "no loss was logged")
    else:
        _steps_axis(ax, last_step(train, evals))
        if all(v > 0 for _, v in points + checks):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.legend(frameon=False, fontsize=8)
    ax.set_ylabel("loss (answer tokens, log scale)")
    ax.set_title("loss", fontsize=10)
    return fig


def lr_curve(train: Sequence[dict]) -> Figure:
    """The learning rate by step, as logged."""
    fig = Figure(figsize=(5.4, 3.8))
    ax = fig.add_subplot()
    points = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if points:
        ax.plot(*zip(*points, strict=True), color=BLUE, lw=1.2)
        _steps_axis(ax, last_step(train))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "no learning rate was logged")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate", fontsize=10)
    return fig


def eval_curves(evals: Sequence[dict], series: Sequence[tuple[str, str]], last: int | None = None) -> Figure:
    """Evaluation metrics (fractions, drawn in percent) by step; ``series`` is (key, label) pairs; ``last`` is
    the run's last step (the x axis ends there, as in the loss plot)."""
    fig = Figure(figsize=(5.4, 3.8))
    ax = fig.add_subplot()
    drawn = 0
    colors = [BLUE, ORANGE, GREEN, RED, "#7c3aed", "#0891b2"]
    for (key, label), color in zip(series, colors, strict=False):
        points = [(r["step"], 100 * r[key]) for r in evals if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), color=color, marker="o", ms=4, lw=1.2, label=label)
            drawn += 1
    if drawn:
        _steps_axis(ax, last or last_step(evals))
        ax.set_ylim(bottom=0)
        percent_axis(ax.yaxis)
        ax.legend(frameon=False, fontsize=8)
    else:
        _empty(ax, "no evaluation logged these metrics")
    ax.set_ylabel("percent")
    ax.set_title("validation metrics by step", fontsize=10)
    return fig
