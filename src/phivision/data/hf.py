"""A dataset directory as a Hugging Face ``datasets.DatasetDict``: the bridge to the rest of the ecosystem."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from phivision.data.layout import IMAGE_PATHS, SPLITS, load_catalog


def to_hf_dataset(directory: str | os.PathLike, decode: bool = True) -> Any:
    """Load ``DIR`` (the phivision layout) as a ``datasets.DatasetDict`` with the splits ``train``, ``val`` and
    ``test`` (an empty split is present, with the same features).

    Every catalog column is kept (``product_code``, ``title``, ``category``, ``full_price``, ``currency``,
    ``image_path``, ``image_paths``, ``split`` and any source column such as ``brand``). ``images`` is a
    ``Sequence(Image)`` with every photo of the product in order (the name TRL's vision collators read), and
    ``image`` the first photo alone (a ``datasets.Image``); both decode to PIL on access (``decode=False`` gives
    ``{"path", "bytes"}``). The catalog is checked first, so a broken dataset fails here with one line naming
    the row.

    ``ds.push_to_hub(...)`` embeds the image files; ``ds.save_to_disk(...)`` keeps the paths.
    """
    import datasets

    directory = Path(directory)
    catalog = load_catalog(directory)
    catalog.insert(0, "image", [str((directory / rel).absolute()) for rel in catalog["image_path"]])
    catalog.insert(
        1, "images", [[str((directory / r).absolute()) for r in rels] for rels in catalog[IMAGE_PATHS]]
    )
    full = datasets.Dataset.from_pandas(catalog, preserve_index=False)
    full = full.cast_column("image", datasets.Image(decode=decode))
    full = full.cast_column("images", datasets.Sequence(datasets.Image(decode=decode)))
    rows = {split: [i for i, s in enumerate(catalog["split"]) if s == split] for split in SPLITS}
    return datasets.DatasetDict({split: full.select(rows[split]) for split in SPLITS})
