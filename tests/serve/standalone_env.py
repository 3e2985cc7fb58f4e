"""A clean virtual environment WITHOUT phivision, built once and cached, to load exports as outside users do.

The venv gets the test process's own torch (``pip install torch==X``: the CPU wheel on disk, never a fresh
resolve) and the same transformers 5.x stack; an overlay directory holds a transformers 4.4x release with the
tokenizers and huggingface-hub it accepts, put first on ``PYTHONPATH`` for the 4.x checks. It is built under a
file lock (pytest-xdist workers share it) in the temp directory, keyed by the versions, and reused afterwards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

# The transformers 4.4x release the 4.x checks use, with the tokenizers/huggingface-hub it accepts
# (transformers 4.49 wants tokenizers>=0.21,<0.22 and huggingface-hub>=0.26,<1.0).
TRANSFORMERS_4 = ("transformers==4.49.0", "tokenizers==0.21.4", "huggingface-hub==0.36.2")
CHECK_SCRIPT = Path(__file__).with_name("standalone_check.py")
_LAYOUT_VERSION = "1"  # bump when the build steps change


def _pins() -> tuple[list[str], list[str]]:
    """(torch pin, transformers 5.x stack pins): the versions this test process runs."""
    torch_version = version("torch").split("+")[0]
    stack = [f"{name}=={version(name)}" for name in ("transformers", "tokenizers", "huggingface-hub")]
    stack += [f"{name}=={version(name)}" for name in ("safetensors", "pillow", "numpy")]
    return [f"torch=={torch_version}"], stack


@dataclass(frozen=True)
class CleanEnv:
    """A venv without phivision; :meth:`check` runs ``standalone_check.py`` in it and returns its JSON."""

    root: Path
    build_seconds: float

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def transformers4(self) -> Path:
        return self.root / "transformers4"

    def check(self, spec: dict, workdir: Path, transformers4: bool = False, timeout: int = 600) -> dict:
        """Run the check script on ``spec`` (see standalone_check.py) from ``workdir``; fail with its stderr."""
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path, out_path = workdir / "spec.json", workdir / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST", "HF_", "TRANSFORMERS_"))
        }
        env.update(
            HF_HOME=str(workdir / "hf-home"),  # remote code is copied fresh under HF_HOME/modules
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONNOUSERSITE="1",
            OMP_NUM_THREADS="1",
        )
        if transformers4:
            env["PYTHONPATH"] = str(self.transformers4)
        proc = subprocess.run(
            [str(self.python), str(CHECK_SCRIPT), str(spec_path), str(out_path)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"standalone check failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        result = json.loads(out_path.read_text())
        result["stderr"] = proc.stderr
        out_path.write_text(json.dumps(result))
        return result


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{proc.stderr[-4000:]}")


def _build(root: Path) -> None:
    torch_pin, stack = _pins()
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
    python = root / "bin" / "python"
    _pip(python, *torch_pin)  # alone first: the CPU wheel on disk, so nothing resolves torch afresh
    _pip(python, *torch_pin, *stack)
    _pip(python, "--target", str(root / "transformers4"), *TRANSFORMERS_4)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, made by ``build(target)`` by the first process that asks; the others wait and reuse it.

    pytest-xdist workers are separate processes with their own session fixtures: this makes an expensive
    artifact (a venv, a training run, an export) exist once. A build that died half-way is redone.
    """
    done = target.with_name(target.name + ".done")
    with _locked(target.with_name(target.name + ".lock")):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            build(target)
            done.touch()
    return target


def clean_env(cache_dir: Path | None = None) -> CleanEnv:
    """The cached clean venv, built first if missing (once, whatever the number of workers)."""
    torch_pin, stack = _pins()
    key_text = "\n".join([sys.version, _LAYOUT_VERSION, *torch_pin, *stack, *TRANSFORMERS_4])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache = cache_dir or Path(
        os.environ.get("PHIVISION_CLEAN_VENV_DIR", Path(tempfile.gettempdir()) / "phivision-clean-venvs")
    )
    cache.mkdir(parents=True, exist_ok=True)

    def build(root: Path) -> None:
        start = time.perf_counter()
        _build(root)
        (root / "build.json").write_text(json.dumps({"build_seconds": round(time.perf_counter() - start, 1)}))

    root = build_once(cache / f"venv-{key}", build)
    return CleanEnv(root=root, build_seconds=json.loads((root / "build.json").read_text())["build_seconds"])
