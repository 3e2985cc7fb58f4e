"""The two directory layouts every part reads and writes: a dataset (``DIR/catalog.parquet``, ``DIR/images/``,
``DIR/prepare_report.json``) and a training run (:class:`RunLayout`).

A product has one or more photos, in order: ``image_paths`` (a list column) holds them all and ``image_path`` the
first, so a reader that knows one photo per product reads every dataset, and a dataset written before
``image_paths`` existed (``image_path`` only) reads as products with one photo each.

Row numbers in messages count as a spreadsheet shows the table: the header is row 1, the first product row 2.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from phivision.args import SPLITS
from phivision.data.prices import plain
from phivision.errors import PhivisionError
from phivision.io import ReadError, atomic_write_text, check_regular_file, warn

CATALOG_FILE = "catalog.parquet"
IMAGES_DIR = "images"
REPORT_FILE = "prepare_report.json"
REQUIRED_COLUMNS = ("product_code", "title", "category", "full_price", "currency", "image_path", "split")
TEXT_COLUMNS = ("product_code", "title", "category", "currency", "image_path", "split")
IMAGE_PATHS = "image_paths"  # every photo of the product, in order (optional: absent = [image_path])
INSPECT_FILES = ("inspect.html", "inspect.json")  # written by `phivision inspect` beside the catalog
MAX_CATALOG_BYTES = 4 << 30
REPLACEMENT_DIR = ".replacement"  # inside --out: the dataset that --overwrite builds beside the old one
SWAP_MARKER = ".complete"  # in REPLACEMENT_DIR: the new dataset is whole and being swapped in
OLD_IMAGES_DIR = "old-images"  # in REPLACEMENT_DIR: the replaced images, until the swap is done  # a catalog of millions of products is a few hundred MB


@dataclass(frozen=True)
class RunLayout:
    """Every file of a training RUN directory, named once: ``train`` writes them; ``evaluate``, ``report``,
    ``predict``, ``serve``, ``export`` and the demo read them::

        RUN/config.yaml              the resolved training config (what `train --print-config` prints)
        RUN/labels.json              the train split's categories and the catalog's currency (constrained answers)
        RUN/calibration.json         the price ranges' calibration on the val split (written after training)
        RUN/adapter/  or  RUN/model/ the LoRA/QLoRA adapter (PEFT files), or the full fine-tune's weights
        RUN/processor/               the processor the run trained with
        RUN/trainer_state.json       steps, the best metric and its step, every evaluation
        RUN/metrics.jsonl            one line per logged training step and per evaluation
        RUN/checkpoints/step-N/      resumable checkpoints (each with its own trainer_state.json)
        RUN/eval/<stage>/            one evaluation (before, after, ...): metrics.json + predictions.jsonl
        RUN/report.html              `phivision report --run RUN`
    """

    root: Path

    CONFIG = "config.yaml"
    LABELS = "labels.json"
    CALIBRATION = "calibration.json"
    ADAPTER = "adapter"
    MODEL = "model"
    PROCESSOR = "processor"
    TRAINER_STATE = "trainer_state.json"
    METRICS_LOG = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    EVAL = "eval"
    EVAL_METRICS = "metrics.json"
    EVAL_PREDICTIONS = "predictions.jsonl"
    REPORT = "report.html"

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def labels(self) -> Path:
        return self.root / self.LABELS

    @property
    def calibration(self) -> Path:
        return self.root / self.CALIBRATION

    @property
    def adapter(self) -> Path:
        return self.root / self.ADAPTER

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def processor(self) -> Path:
        return self.root / self.PROCESSOR

    @property
    def trainer_state(self) -> Path:
        return self.root / self.TRAINER_STATE

    @property
    def metrics_log(self) -> Path:
        return self.root / self.METRICS_LOG

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def evals(self) -> Path:
        return self.root / self.EVAL

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def eval_dir(self, stage: str) -> Path:
        """Where one evaluation lives: ``RUN/eval/<stage>/`` (stages: ``before``, ``after``)."""
        return self.evals / stage

    def is_run(self) -> bool:
        """A finished (or checkpointed) training run: its config and its weights, adapter or full model."""
        return self.config.is_file() and (self.adapter.is_dir() or self.model.is_dir())


def sheet_row(index: int) -> int:
    """The spreadsheet row of the product at 0-based position ``index`` (row 1 is the header)."""
    return int(index) + 2


def path_problem(rel: object) -> str | None:
    """Why ``rel`` is not a safe image path inside a dataset directory, or None. The check is on the text:
    absolute paths and ``..`` are refused, while ``images/`` itself may be a symlink (shared storage, caches)."""
    if not isinstance(rel, str) or not rel.strip():
        return "empty"
    if "\x00" in rel:  # no file system takes it; Python refuses it with a ValueError
        return "nul"
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or rel.startswith(("/", "\\")):
        return "absolute"
    if ".." in posix.parts or ".." in windows.parts:
        return "parent"
    return None


def load_catalog(directory: str | os.PathLike, check_images: bool = True) -> pd.DataFrame:
    """Read ``DIR/catalog.parquet`` and check it against the layout, so a broken dataset fails here with a
    message naming the file, column or row, not later inside a training step.

    Returns the catalog with text columns as ``str``, ``full_price`` as ``float64`` and ``image_paths`` as a list
    of relative paths per product (``[image_path]`` for a catalog without that column).
    """
    directory = Path(directory)
    path = directory / CATALOG_FILE
    if not path.exists():
        raise PhivisionError(
            f"{path}: not found (write a dataset with `phivision prepare` or `phivision sample`)"
        )
    try:
        check_regular_file(path, MAX_CATALOG_BYTES)
        frame = pd.read_parquet(path)
    except ReadError:
        raise
    except Exception as err:
        raise PhivisionError(f"{path}: cannot read parquet: {err}") from None
    frame = _with_image_columns(frame, path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise PhivisionError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:  # never written by prepare or sample: every verb needs at least one product
        raise PhivisionError(f"{path}: no products (an empty catalog)")
    for column in TEXT_COLUMNS:
        bad = frame[column].map(lambda v: not isinstance(v, str) or not v.strip())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise PhivisionError(
                f"{path} row {sheet_row(row)}: column '{column}': empty or not text "
                f"({plain(frame[column].iloc[row])!r})"
            )
    try:
        prices = pd.to_numeric(frame["full_price"], errors="raise").astype("float64")
    except (ValueError, TypeError) as err:
        raise PhivisionError(f"{path}: column 'full_price': not numeric ({err})") from None
    bad = ~(prices > 0) | ~prices.map(lambda p: p < float("inf"))
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise PhivisionError(
            f"{path} row {sheet_row(row)}: column 'full_price': {plain(prices.iloc[row])!r} is not a positive price"
        )
    frame["full_price"] = prices
    bad = ~frame["split"].isin(SPLITS)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise PhivisionError(
            f"{path} row {sheet_row(row)}: column 'split': {frame['split'].iloc[row]!r} is not one of "
            f"{', '.join(SPLITS)}"
        )
    for row, paths in enumerate(frame[IMAGE_PATHS]):
        for k, rel in enumerate(paths, start=1):
            where = f"{path} row {sheet_row(row)}: column " + (
                "'image_path'" if len(paths) == 1 else f"'{IMAGE_PATHS}' item {k}"
            )
            problem = path_problem(rel)
            if problem:
                why = {"absolute": "is an absolute path", "nul": "is a path holding a NUL byte"}.get(
                    problem, "leaves the directory (..)"
                )
                raise PhivisionError(f"{where}: {rel!r} {why}")
            if check_images and not (directory / rel).is_file():
                raise PhivisionError(f"{where}: {directory / rel} not found")
    return frame.reset_index(drop=True)


def _with_image_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Both image columns, consistent: ``image_paths`` as lists of text (``[image_path]`` where the catalog has
    none) and ``image_path`` its first item. Either column alone is enough; both must agree on the first photo."""
    if IMAGE_PATHS not in frame.columns:
        if "image_path" in frame.columns:
            frame[IMAGE_PATHS] = pd.Series(
                [[p] for p in frame["image_path"]], index=frame.index, dtype=object
            )
        return frame
    lists = []
    for row, cell in enumerate(frame[IMAGE_PATHS]):
        items = list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else None
        if not items or not all(isinstance(p, str) and p.strip() for p in items):
            raise PhivisionError(
                f"{path} row {sheet_row(row)}: column '{IMAGE_PATHS}': expected a non-empty list of relative "
                f"paths, got {plain(cell)!r}"
            )
        lists.append(items)
    frame[IMAGE_PATHS] = pd.Series(lists, index=frame.index, dtype=object)
    if "image_path" not in frame.columns:
        frame.insert(list(frame.columns).index(IMAGE_PATHS), "image_path", [items[0] for items in lists])
        return frame
    for row, (first, items) in enumerate(zip(frame["image_path"], lists, strict=True)):
        if first != items[0]:
            raise PhivisionError(
                f"{path} row {sheet_row(row)}: column 'image_path': {plain(first)!r} is not the first photo of "
                f"'{IMAGE_PATHS}' ({items[0]!r})"
            )
    return frame


def dataset_files(directory: str | os.PathLike, catalog: pd.DataFrame) -> list[tuple[str, Path]]:
    """What a verb reading the dataset reads, for :func:`phivision.io.refuse_overwriting_inputs`: the catalog,
    the report and every image, each with how to name it."""
    directory = Path(directory)
    files = [("the catalog", directory / CATALOG_FILE), ("the dataset's report", directory / REPORT_FILE)]
    column = IMAGE_PATHS if IMAGE_PATHS in catalog.columns else "image_path"
    return files + [
        (f"the image of catalog row {sheet_row(row)}", directory / rel)
        for row, paths in enumerate(catalog[column])
        for rel in ([paths] if isinstance(paths, str) else paths)
    ]


# ------------------------------------------------------------------------------------------- out directory


def dataset_identity(kind: str, sources: Sequence[str]) -> dict:
    """What makes a dataset directory "the same dataset" for a rerun: the command and its sources (local paths
    resolved, so a rerun from another directory matches)."""
    resolved = []
    for source in sources:
        path = Path(source).expanduser()
        resolved.append(str(path.resolve()) if path.exists() else source)
    return {"kind": kind, "sources": resolved}


def claim_out(out: Path, identity: dict, given_sources: Sequence[str], overwrite: bool) -> Path:
    """Refuse an ``--out`` that holds another dataset (or images of unknown origin); a rerun of the same command
    passes (and resumes). Returns the directory to build the dataset in.

    That is ``out`` itself, except with ``overwrite`` of another dataset: the new one is then built beside the
    old, in ``out/.replacement``, and :func:`finish_out` swaps it in only once it is complete. The old dataset
    (and any source inside ``out``) stays whole until then: a failed, refused or killed run loses nothing, and a
    rerun with ``--overwrite`` resumes the replacement. Nothing else in the directory is touched."""
    if out.exists() and not out.is_dir():
        raise PhivisionError(f"--out {out}: exists and is not a directory")
    staging = out / REPLACEMENT_DIR
    if (staging / SWAP_MARKER).exists():  # a kill interrupted a swap: finish it before anything else
        _roll_forward(out, staging)
        warn(f"{out}: finished replacing the dataset, which a stopped run had left half swapped")
    holder = other_dataset(out, identity, given_sources)
    if holder is None:
        return out
    if not overwrite:
        raise PhivisionError(f"--out {out}: holds another dataset ({holder}); pass --overwrite to replace it")
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise PhivisionError(f"{staging}: not a directory phivision wrote; remove it")
    if staging.exists() and other_dataset(staging, identity, given_sources) is not None:
        shutil.rmtree(staging)  # an unfinished replacement by another command: start this one afresh
    return staging  # created by the first file written into it


def finish_out(out: Path, build: Path) -> None:
    """Swap the finished dataset in ``build`` (from :func:`claim_out`) into ``out``; nothing when they are the
    same. The swap is a few renames; a marker written first lets any later run finish one that a kill cut."""
    if build == out:
        return
    atomic_write_text(build / SWAP_MARKER, "a complete dataset, being moved into the directory above\n")
    _roll_forward(out, build)


def _roll_forward(out: Path, staging: Path) -> None:
    """Move the dataset in ``staging`` into ``out`` (each step skipped when already done), then delete the old
    images and ``staging``. Catalog before report: the report names the dataset ``out`` holds."""
    old_images, new_images, images = staging / OLD_IMAGES_DIR, staging / IMAGES_DIR, out / IMAGES_DIR
    if new_images.exists():
        if images.exists() or images.is_symlink():
            _remove_images(old_images)
            os.replace(images, old_images)
        os.replace(new_images, images)
    for name in INSPECT_FILES:  # they describe the old dataset
        (out / name).unlink(missing_ok=True)
    for name in (CATALOG_FILE, REPORT_FILE):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    _remove_images(old_images)
    shutil.rmtree(staging)


def _remove_images(images: Path) -> None:
    """Delete an images folder; a symlinked one is unlinked, its target left alone."""
    if images.is_symlink() or images.is_file():
        images.unlink()
    elif images.is_dir():
        shutil.rmtree(images)


def other_dataset(out: Path, identity: dict, given_sources: Sequence[str]) -> str | None:
    """A short description of the dataset ``out`` holds when it is not the one ``identity`` names, else None."""
    report_path, catalog, images = out / REPORT_FILE, out / CATALOG_FILE, out / IMAGES_DIR
    if not report_path.exists():
        if catalog.exists():
            return f"{CATALOG_FILE} without {REPORT_FILE}"
        if images.exists() and any(images.iterdir()):
            return f"{IMAGES_DIR}/ without {REPORT_FILE}"
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        recorded = report.get("dataset")
        listed = [str(s["source"]) for s in report.get("sources", [])]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return f"an unreadable {REPORT_FILE}"
    if recorded == identity or (recorded is None and listed == list(given_sources)):
        return None
    kind = (recorded or {}).get("kind", "a dataset")
    names = (recorded or {}).get("sources") or listed
    return f"{kind} of {', '.join(map(str, names)) or 'unknown sources'}"
