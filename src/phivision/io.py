"""Atomic file writes and bounded reads.

Writes: a reader (or a rerun after SIGKILL) sees the old file or the new one, never half of one.

Files and directories are created with the permissions of the user's umask (as ``open`` and ``mkdir`` would),
not owner-only: a dataset or a checkpoint is often shared. A write that fails on the disk (full, quota, file size
limit, read-only) raises :class:`WriteError`, one line naming the file, and leaves the old file untouched.

Reads: every file phivision reads that a user or a hostile dataset could have replaced goes through
:func:`read_bytes_bounded` (or :func:`check_regular_file` before a library opens it): regular files only (a
symlink to one is fine), opened non-blocking, never more than a stated number of bytes. A FIFO cannot hang a
verb and a symlink to ``/dev/zero`` cannot fill memory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
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

    def at(self, path: str | os.PathLike) -> WriteError:
        """The same failure, naming ``path`` (the folder being written rather than a temporary file in it)."""
        number = self.errno if self.errno is not None else errno.EIO
        return WriteError(path, OSError(number, os.strerror(number)))


# The largest JSON, YAML or JSON Lines file phivision reads (run files, configs, predictions): far above any it
# writes (a million-step metrics.jsonl is about 200 MB), far below what would exhaust memory.
MAX_TEXT_BYTES = 1 << 30


class ReadError(PhivisionError, OSError):
    """A file that cannot be read safely. ``reason`` is short and machine-readable: ``missing``, ``not_a_file``
    (a directory, device, FIFO or socket), ``too_large``, ``unreadable`` (permission, I/O error) or
    ``not_text`` (not UTF-8)."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = str(path), reason, detail
        self.strerror = detail  # what handlers of OSError print

    def __str__(self) -> str:
        return str(self.args[0])


def _open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file at ``path`` (symlinks followed). Non-blocking, so opening a
    FIFO returns at once instead of waiting for a writer; anything but a regular file is then refused."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ReadError(path, "missing", "not found") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise ReadError(
            path, "unreadable", f"cannot open ({getattr(err, 'strerror', None) or err})"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        os.close(fd)
        raise ReadError(path, "unreadable", f"cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        )
        raise ReadError(path, "not_a_file", f"not a regular file ({kind})")
    return fd


def check_regular_file(path: str | os.PathLike, max_bytes: int) -> int:
    """The size of the regular file at ``path``; raises :class:`ReadError` for anything else or a file over
    ``max_bytes``. For files a library opens by name itself (parquet, safetensors)."""
    path = Path(path)
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > max_bytes:
        raise ReadError(path, "too_large", f"{size:,} bytes, more than the limit of {max_bytes:,}")
    return size


def read_bytes_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes`` of them (else :class:`ReadError`)."""
    path = Path(path)
    fd = _open_regular(path)
    try:
        if os.fstat(fd).st_size > max_bytes:
            raise ReadError(
                path, "too_large", f"{os.fstat(fd).st_size:,} bytes, more than the limit of {max_bytes:,}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        if isinstance(err, ReadError):
            raise
        raise ReadError(path, "unreadable", f"cannot read ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while being read
        raise ReadError(path, "too_large", f"more than the limit of {max_bytes:,} bytes")
    return data


def read_text_bounded(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file at ``path`` (see :func:`read_bytes_bounded`)."""
    data = read_bytes_bounded(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ReadError(
            path, "not_text", f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def read_json_lines(
    path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES
) -> tuple[list[tuple[int, str]], str | None]:
    """The non-blank lines of a JSON Lines file as ``(line number, text)``, and a note when its last line was
    cut (no newline at the end and not valid JSON: a writer killed mid-line). The cut line is left out: every
    reader of a file phivision appends to survives it, and says so."""
    text = read_text_bounded(path, max_bytes)
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if lines and not text.endswith("\n"):
        number, last = lines[-1]
        try:
            json.loads(last)
        except ValueError:
            lines.pop()
            return lines, f"{path} line {number}: cut short (a killed writer?); skipped"
    return lines, None


def warn(message: str) -> None:
    """One ``warning:`` line on stderr: something was skipped or repaired, and the user should know."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _reason(err: OSError) -> str:
    """``No space left on device``, also from libraries (pyarrow) that only put ``[errno 28]`` in the text."""
    number = _errno_of(err)
    if number is not None:
        return os.strerror(number)
    return err.strerror or str(err) or type(err).__name__


# The machine's state, not a bug: a full disk, a quota, a file-size limit, a read-only file system.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _errno_of(err: BaseException) -> int | None:
    """The errno of an OSError, or the one a library put in its message: pyarrow ``[errno 28]``, safetensors
    (Rust) ``(os error 28)``."""
    number = getattr(err, "errno", None)
    if isinstance(number, int):
        return number
    found = re.search(r"\[errno (\d+)\]|\(os error (\d+)\)", str(err), re.IGNORECASE)
    return int(found.group(1) or found.group(2)) if found else None


@contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk (quota, file-size limit, read-only file system) met by any library inside the block
    into one :class:`WriteError` naming ``path``; any other error passes unchanged."""
    try:
        yield
    except PhivisionError:
        raise
    except Exception as err:
        number = _errno_of(err)
        if number not in DISK_ERRNOS:
            raise
        raise WriteError(path, OSError(number, os.strerror(number))) from err


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
    failure it is deleted, so ``path`` is never a half-written directory. A full disk is one
    :class:`WriteError` naming ``path``.

    The temporary directory is locked while it is filled; one that a killed run left behind (unlocked) is
    removed, with a warning, the next time ``path`` is written."""
    path = require_empty_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _make_temporary_dir(path)
    lock = _lock(tmp)
    try:
        with disk_errors(path):
            yield tmp
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _lock(directory: Path, wait: bool = True) -> int | None:
    """An exclusive ``flock`` on ``directory`` (held until the descriptor is closed), or None when another
    process holds it (``wait=False``) or the platform has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, no clean-up of other runs' leftovers
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of ``path`` (``.NAME.xxxxxxxx.tmp`` directories) that no live process
    holds: what a killed export or ``tiny`` left behind. Each removal is announced with a ``warning:`` line."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp$")
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        if not pattern.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        lock = _lock(entry, wait=False)
        if lock is None:  # being written right now by another run
            continue
        try:
            shutil.rmtree(entry)
        finally:
            os.close(lock)
        warn(f"removed {entry}: the unfinished temporary folder of an earlier run that was stopped")
        removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------ outputs vs inputs


def _identity(path: Path) -> tuple[int, int] | str:
    """What makes two paths one file: its device and inode (through symlinks and hard links) when it exists."""
    try:
        info = os.stat(path)
        return (info.st_dev, info.st_ino)
    except (OSError, ValueError):
        return os.path.realpath(path)


def refuse_overwriting_inputs(
    outputs: dict[str, str | os.PathLike], inputs: Iterable[tuple[str, str | os.PathLike | None]]
) -> None:
    """The one check every verb makes before writing: no output path is one of its inputs (the same file, also
    through a symlink or a hard link) or another of its outputs. ``outputs`` maps what the user would call each
    output (``--out``, ``the JSON beside --out``) to its path; ``inputs`` pairs what each input is (``the
    catalog``, ``an image``) with its path. Raises one :class:`PhivisionError` naming both."""
    taken: dict[tuple[int, int] | str, str] = {}
    for what, path in inputs:
        if path is not None:
            taken.setdefault(_identity(Path(path)), what)
    for what, path in outputs.items():
        key = _identity(Path(path))
        if key in taken:
            raise PhivisionError(
                f"{what} {path}: is {taken[key]}, which this command reads; pick another path"
            )
        taken[key] = f"also {what}"
