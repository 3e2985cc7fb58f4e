"""A clean virtual environment WITHOUT phivision, built once and cached, to load exports as outside users do.

The venv gets the test process's own torch (``pip install torch==X``: the CPU wheel on disk, never a fresh
resolve) and the same transformers 5.x stack. Overlays are directories put first on ``PYTHONPATH``: a transformers
4.x release with the tokenizers and huggingface-hub it accepts (:data:`OVERLAYS`), or the official remote code's
own environment (:data:`ORACLE`). Everything is built under a file lock (pytest-xdist workers share it) in the
temp directory, keyed by the versions, once, when first asked for, and reused afterwards.
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

# transformers 4.x releases an export must load in, each with the tokenizers/huggingface-hub it accepts (4.48 and
# 4.49 want tokenizers>=0.21,<0.22, 4.57 tokenizers>=0.22,<=0.23.0; all want huggingface-hub<1.0). 4.48 is the
# release the official Phi-3-Vision code runs on, 4.49 the newest before the processor API changed, 4.57 the last 4.x.
OVERLAYS = {
    "4.48": ("transformers==4.48.3", "tokenizers==0.21.4", "huggingface-hub==0.36.2"),
    "4.49": ("transformers==4.49.0", "tokenizers==0.21.4", "huggingface-hub==0.36.2"),
    "4.57": ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub==0.36.2"),
}
# The official remote code's environment: transformers 4.48 plus what that code and the cookbook's fine-tuning
# recipe import (torchvision for the image processor, peft and accelerate for LoRA). torchvision is added without
# its dependencies so that it never replaces the venv's torch; see oracle_packages().
ORACLE = "oracle-4.48"
ORACLE_PACKAGES = (*OVERLAYS["4.48"], "psutil>=5.9")
ORACLE_NO_DEPS = ("peft==0.14.0", "accelerate==1.3.0")
CHECK_SCRIPT = Path(__file__).with_name("standalone_check.py")
_LAYOUT_VERSION = "2"  # bump when the build steps change


def _pins() -> tuple[list[str], list[str]]:
    """(torch pin, transformers 5.x stack pins): the versions this test process runs."""
    torch_version = version("torch").split("+")[0]
    stack = [f"{name}=={version(name)}" for name in ("transformers", "tokenizers", "huggingface-hub")]
    stack += [f"{name}=={version(name)}" for name in ("safetensors", "pillow", "numpy")]
    return [f"torch=={torch_version}"], stack


def torchvision_pin(torch_version: str) -> str:
    """The torchvision release built for ``torch_version`` (torch 2.N pairs with torchvision 0.N+15)."""
    major, minor, patch = (int(part) for part in torch_version.split("+")[0].split(".")[:3])
    if major != 2:
        raise RuntimeError(f"no torchvision pairing known for torch {torch_version}")
    return f"torchvision==0.{minor + 15}.{patch}"


@dataclass(frozen=True)
class CleanEnv:
    """A venv without phivision; :meth:`check` runs ``standalone_check.py`` in it and returns its JSON."""

    root: Path
    build_seconds: float

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def overlay(self, name: str) -> Path:
        """The overlay ``name`` (a key of :data:`OVERLAYS`, or :data:`ORACLE`), built on first use."""
        if name == ORACLE:
            pins, no_deps = ORACLE_PACKAGES, (*ORACLE_NO_DEPS, torchvision_pin(version("torch")))
        elif name in OVERLAYS:
            pins, no_deps = OVERLAYS[name], ()
        else:
            raise KeyError(f"unknown overlay {name!r}: one of {[*OVERLAYS, ORACLE]}")
        key = hashlib.sha256("\n".join([*pins, "--no-deps", *no_deps]).encode()).hexdigest()[:12]

        def build(target: Path) -> None:
            _pip(self.python, "--target", str(target), *pins)
            if no_deps:
                _pip(self.python, "--target", str(target), "--no-deps", *no_deps)

        return build_once(self.root / "overlays" / f"{name}-{key}", build)

    def environment(self, workdir: Path, overlay: str | None = None, threads: int = 1) -> dict[str, str]:
        """A child environment: offline, its own HF_HOME under ``workdir``, none of the test process's Python
        settings, ``threads`` OpenMP threads and ``overlay`` first on ``PYTHONPATH``."""
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
            OMP_NUM_THREADS=str(threads),
        )
        if overlay is not None:
            env["PYTHONPATH"] = str(self.overlay(overlay))
        return env

    def run(
        self,
        script: Path,
        spec: dict,
        workdir: Path,
        overlay: str | None = None,
        timeout: int = 600,
        threads: int = 1,
    ) -> dict:
        """Run ``script SPEC.json OUT.json`` from ``workdir``; its JSON result plus its stderr. Fails with the
        script's stderr when it exits non-zero."""
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path, out_path = workdir / "spec.json", workdir / "result.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [str(self.python), str(script), str(spec_path), str(out_path)],
            cwd=workdir,
            env=self.environment(workdir, overlay, threads),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"{script.name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        result = json.loads(out_path.read_text())
        result["stderr"] = proc.stderr
        out_path.write_text(json.dumps(result))
        return result

    def check(self, spec: dict, workdir: Path, overlay: str | None = None, timeout: int = 600) -> dict:
        """Run the check script on ``spec`` (see standalone_check.py) from ``workdir``, under ``overlay``."""
        return self.run(CHECK_SCRIPT, spec, workdir, overlay, timeout)


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
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            build(target)
            done.touch()
    return target


def clean_env(cache_dir: Path | None = None) -> CleanEnv:
    """The cached clean venv, built first if missing (once, whatever the number of workers)."""
    torch_pin, stack = _pins()
    key_text = "\n".join([sys.version, _LAYOUT_VERSION, *torch_pin, *stack])
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
