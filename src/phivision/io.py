"""Atomic file writes: a reader (or a rerun after SIGKILL) sees the old file or the new one, never half of one.

Files and directories are created with the permissions of the user's umask (as ``open`` and ``mkdir`` would),
not owner-only: a dataset or a checkpoint is often shared. A write that fails on the disk (full, quota, file size
limit, read-only) raises :class:`WriteError`, one line naming the file, and leaves the old file untouched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from phivision.errors import PhivisionError


class WriteError(PhivisionError, OSError):
    """A file could not be written (no space left, file too large, permission denied...). Also an ``OSError``,
    so code that handles disk errors keeps working; the CLI prints it as one ``error:`` line."""

    def __init__(self, path: str | os.PathLike, err: OSError) -> None:
        super().__init__(f"{path}: cannot write: {_reason(err)}")
        self.errno = err.errno
        self.path = str(path)

    def __str__(self) -> str:  # the one line, not OSError's "[Errno N] ..." layout
        return str(self.args[0])


def _reason(err: OSError) -> str:
    """``No space left on device``, also from libraries (pyarrow) that only put ``[errno 28]`` in the text."""
    number = err.errno
    if number is None:
        found = re.search(r"\[errno (\d+)\]", str(err), re.IGNORECASE)
        number = int(found.group(1)) if found else None
    if number is not None:
        return os.strerror(number)
    return err.strerror or str(err) or type(err).__name__


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _create_temporary_file(path: Path) -> Path:
    """An empty new file beside ``path``; mode 0666 filtered by the umask (``mkstemp`` would force 0600)."""
    for _ in range(100):
        tmp = _temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary_file(path)
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, PhivisionError):
            raise WriteError(path, err) from err
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def atomic_write_parquet(path: str | os.PathLike, frame: Any) -> Path:
    """Write a pandas DataFrame to parquet atomically."""
    return _atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def require_empty_dir(path: str | os.PathLike) -> Path:
    """Refuse an ``--out`` that holds anything: a checkpoint directory is written whole, never merged into."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PhivisionError(f"--out {path}: already exists and is not an empty directory")
    return path


def _make_temporary_dir(path: Path) -> Path:
    """A new empty directory beside ``path``; mode 0777 filtered by the umask (``mkdtemp`` would force 0700)."""
    for _ in range(100):
        tmp = _temporary_name(path)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it replaces ``path`` (absent or empty), on any
    failure it is deleted, so ``path`` is never a half-written directory."""
    path = require_empty_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temporary_dir(path)
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
