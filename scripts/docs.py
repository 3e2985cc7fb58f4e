"""Regenerate docs/config.md and docs/cli.md from the option declarations: ``python scripts/docs.py``.

``--check`` exits 1 (writing nothing) when a file is stale; the test suite runs the same comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

from phivision.io import atomic_write_text
from phivision.reference import DOCS

ROOT = Path(__file__).resolve().parents[1] / "docs"


def main() -> int:
    stale = []
    for name, render in DOCS.items():
        path, text = ROOT / name, render()
        if "--check" in sys.argv[1:]:
            if (path.read_text(encoding="utf-8") if path.exists() else "") != text:
                stale.append(name)
            continue
        atomic_write_text(path, text)
        print(f"wrote {path}")
    for name in stale:
        print(f"{ROOT / name} is stale: run python scripts/docs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
