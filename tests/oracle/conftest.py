"""The oracle stage: phivision against Microsoft's official Phi-3-Vision code, run in its own environment.

The official remote code is read from ``../shared/reference/`` (or ``$PHIVISION_SHARED_REFERENCE``); it is never
copied into the repository. Where that folder is absent (a user's fresh clone) the stage is skipped with the
reason (``.ci/run`` looks for the folder beside the clone and at ``/work/shared/reference``, and says which it used).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serve"))  # the clean-venv machinery (standalone_env.py)
sys.path.insert(0, str(Path(__file__).parent))

from oracle_setup import REFERENCE_NAME, product_photo, shared_reference, write_oracle_standin  # noqa: E402
from standalone_env import ORACLE, CleanEnv, build_once, clean_env  # noqa: E402


@pytest.fixture(scope="session")
def official_reference() -> Path:
    """The real checkpoint's small files WITH the official remote code (``official-code/``)."""
    folder = shared_reference() / REFERENCE_NAME
    if not (folder / "official-code" / "modeling_phi3_v.py").is_file():
        reason = f"{folder}/official-code not found (set PHIVISION_SHARED_REFERENCE to shared/reference)"
        pytest.skip(reason)
    return folder


@pytest.fixture(scope="session")
def oracle_env(official_reference: Path) -> CleanEnv:
    """The clean venv with the official code's environment (transformers 4.48) built as an overlay (only where
    there is official code to run)."""
    env = clean_env()
    env.overlay(ORACLE)
    return env


@pytest.fixture(scope="session")
def standin(official_reference: Path, shared_dir: Path) -> Path:
    """The stand-in checkpoint, float32, with the official code beside the weights as the download has it."""
    return build_once(
        shared_dir / "oracle-standin", lambda out: write_oracle_standin(out, official_reference)
    )


@pytest.fixture(scope="session")
def photos(shared_dir: Path) -> list[Path]:
    """Four photos of different sizes and aspect ratios (landscape, portrait, wide, small)."""
    drawings = [
        ((300, 200), (200, 40, 40), "ellipse"),
        ((180, 420), (30, 150, 90), "rectangle"),
        ((900, 260), (40, 60, 210), "ellipse"),
        ((64, 64), (230, 180, 20), "rectangle"),
    ]

    def build(folder: Path) -> None:
        folder.mkdir()
        for i, (size, colour, shape) in enumerate(drawings):
            product_photo(size, colour, shape).save(folder / f"photo{i}.png")

    folder = build_once(shared_dir / "oracle-photos", build)
    return sorted(folder.glob("photo*.png"))
