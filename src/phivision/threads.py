"""OpenMP's waiting threads, set before torch loads: ``phivision demo`` trains a tiny model whose operations are so
small that spinning threads cost more than they save (see :func:`quiet_openmp_waits`). Standard library only, so
``phivision.api.demo`` can call it before anything imports torch."""

from __future__ import annotations

import os
import sys

WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # OpenMP, libgomp, LLVM/Intel libomp


def quiet_openmp_waits() -> str | None:
    """Ask torch's OpenMP threads to sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning, and
    return the wait setting in force (``"OMP_WAIT_POLICY=PASSIVE"``), or None when threads spin by default.

    OpenMP reads the setting once, when torch loads, so it is set only before ``import torch`` (``phivision demo``
    never imports torch first) and never over a wait setting of the user's. Why: the tiny model's operations
    are small, so its threads meet at a barrier every few microseconds; a thread spinning there holds a core that
    the thread it waits for, or another process, needs: beside other busy processes the demo's training ran 10
    to 50 times slower (benchmarks/RESULTS.md).
    """
    if "torch" not in sys.modules and not any(name in os.environ for name in WAIT_SETTINGS):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    chosen = [f"{name}={os.environ[name]}" for name in WAIT_SETTINGS if name in os.environ]
    return ", ".join(chosen) or None
