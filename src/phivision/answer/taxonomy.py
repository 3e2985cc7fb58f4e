"""The category space of an answer, and the question that may name it.

A constrained answer picks its category from a list. The list comes from, in this order:

1. **the run's recorded labels** (``RUN/labels.json``, or ``labels`` in an export's ``phivision.json``): the
   categories the model was trained on, which it must keep;
2. **an explicit file** (``--categories FILE``: one category per line, or a JSON list of strings);
3. **the train split of the dataset** (``--data DIR``): the catalog's own taxonomy, so that a base model that
   was never fine-tuned still chooses among real categories (its accuracy is then a real chance-level figure).

Without any of them the category is free text. A question may hold ``{categories}``: it is replaced by the
list, comma-separated, so that a zero-shot model can read the taxonomy it has to choose from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phivision.answer.prompt import PromptFormat
from phivision.data.layout import load_catalog
from phivision.errors import PhivisionError

CATEGORIES_FIELD = "{categories}"
SOURCES = ("run", "file", "data", "none")


@dataclass(frozen=True)
class Taxonomy:
    """The categories an answer may name (sorted; None: free text), where they came from, and a note on any
    other list that was given and not used."""

    categories: tuple[str, ...] | None
    source: str  # "run", "file", "data" or "none"
    path: str | None = None  # the file or dataset they were read from
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """What metrics.json records under ``taxonomy``."""
        count = None if self.categories is None else len(self.categories)
        found = {"source": self.source, "path": self.path, "count": count}
        return found | ({"note": self.note} if self.note else {})


def read_categories_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Categories from ``path``: a JSON list of strings, or one category per line (blank lines skipped).

    Raises PhivisionError naming the file (and line) for anything else: a missing file, an empty list, a
    category that is not one line of printable text.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PhivisionError(f"--categories {path}: no such file") from None
    except UnicodeDecodeError:
        raise PhivisionError(f"--categories {path}: not UTF-8 text") from None
    except OSError as err:
        raise PhivisionError(f"--categories {path}: cannot read ({err.strerror})") from None
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise PhivisionError(
                f"--categories {path} line {err.lineno}: not a JSON list ({err.msg})"
            ) from None
        where = [f"{path} item {i + 1}" for i in range(len(entries))]
    else:
        lines = text.splitlines()
        entries = [line.strip() for line in lines]
        where = [f"{path} line {i + 1}" for i in range(len(lines))]
        entries, where = [e for e in entries if e], [w for w, e in zip(where, entries, strict=True) if e]
    for entry, place in zip(entries, where, strict=True):
        if not isinstance(entry, str) or not entry.strip() or not entry.isprintable():
            raise PhivisionError(
                f"--categories {place}: expected a category as one line of text, got {json.dumps(entry)}"
            )
    if not entries:
        raise PhivisionError(f"--categories {path}: no categories in the file")
    return tuple(sorted({entry.strip() for entry in entries}))


def train_categories(data_dir: str | os.PathLike) -> tuple[str, ...] | None:
    """The categories of the train split of a dataset directory (None when it has no train rows)."""
    catalog = load_catalog(data_dir)
    train = catalog.loc[catalog["split"] == "train", "category"]
    found = sorted({str(c).strip() for c in train if str(c).strip()})
    return tuple(found) or None


def resolve_taxonomy(
    recorded: tuple[str, ...] | None,
    recorded_path: str | None = None,
    categories_file: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Taxonomy:
    """The category space of an answer: the run's ``recorded`` labels, else ``categories_file``, else the train
    split of ``data_dir``, else none. A file given beside recorded labels is read (a broken one still stops)
    and, when it differs, named in the taxonomy's note: the run keeps the categories it was trained on."""
    from_file = read_categories_file(categories_file) if categories_file is not None else None
    if recorded:
        note = None
        if from_file is not None and tuple(sorted(recorded)) != from_file:
            note = (
                f"--categories {categories_file} ({len(from_file)} categories) not used: the model records "
                f"the {len(recorded)} it was trained on"
            )
        return Taxonomy(tuple(sorted(recorded)), "run", recorded_path, note)
    if from_file is not None:
        return Taxonomy(from_file, "file", str(categories_file))
    if data_dir is not None:
        found = train_categories(data_dir)
        if found:
            return Taxonomy(found, "data", str(data_dir))
    return Taxonomy(None, "none")


def model_taxonomy(
    loaded: Any, categories_file: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None
) -> Taxonomy:
    """:func:`resolve_taxonomy` for a :class:`phivision.runs.LoadedModel` (its recorded categories first)."""
    return resolve_taxonomy(
        getattr(loaded, "categories", None), getattr(loaded, "labels_path", None), categories_file, data_dir
    )


def fill_question(prompt: PromptFormat, categories: tuple[str, ...] | None) -> PromptFormat:
    """``prompt`` with ``{categories}`` in its question replaced by the comma-separated list.

    Raises PhivisionError when the question asks for the list and there is none.
    """
    if CATEGORIES_FIELD not in prompt.question:
        return prompt
    if not categories:
        raise PhivisionError(
            f"the question {prompt.question!r} holds {CATEGORIES_FIELD} but there is no category list: give "
            "--categories FILE or --data with a train split"
        )
    question = prompt.question.replace(CATEGORIES_FIELD, ", ".join(categories))
    return PromptFormat(question, prompt.answer_template)


def with_taxonomy(loaded: Any, taxonomy: Taxonomy, question: str | None = None) -> Any:
    """The loaded model answering within ``taxonomy``, asked ``question`` (default: the one it was trained on),
    with ``{categories}`` filled in. A shallow copy: the weights are shared."""
    prompt = loaded.prompt
    if question is not None:
        try:
            prompt = PromptFormat(question, prompt.answer_template)
        except ValueError as err:
            raise PhivisionError(f"--question: {err}") from None
    return dataclasses.replace(
        loaded, prompt=fill_question(prompt, taxonomy.categories), categories=taxonomy.categories
    )
