"""Regenerate docs/config.md from the training config classes: ``python scripts/config_docs.py``.

``--check`` exits 1 (writing nothing) when the file is stale; the test suite runs the same comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

from phivision.io import atomic_write_text
from phivision.train.config_docs import config_reference

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def main() -> int:
    text = config_reference()
    if "--check" in sys.argv[1:]:
        current = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
        if current != text:
            print(f"{DOCS} is stale: run python scripts/config_docs.py", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(DOCS, text)
    print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
