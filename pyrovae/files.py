"""Files written safely: atomically, with the umask's mode, into directories checked first and
locked while a process writes them; errors as one line. No torch here (the command line uses it
before loading anything)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: directories are not locked
    fcntl = None  # type: ignore[assignment]

from pyrovae.errors import PyrovaeError

__all__ = ["LOCK", "TEMPORARY", "atomic_write", "check_writable", "first_line", "locked", "one_line", "save_printed", "write_json"]

TEMPORARY = ".*.tmp"  # what atomic_write leaves behind when its process is killed
LOCK = ".lock"  # held by the process writing the directory


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file_path)` on a temporary file beside `path`, then move it into place, with
    the mode the umask gives a new file (mkstemp's temporary files are private). A target that
    cannot be written is refused in one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise PyrovaeError(f"cannot write {path}: {error.strerror or one_line(error)}") from error
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise PyrovaeError(f"cannot write {path}: {error.strerror or one_line(error)}") from error
        raise


def check_writable(directory: Path) -> None:
    """Refuse, before any work, a directory that could not be created or written to."""
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PyrovaeError(f"cannot write into {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PyrovaeError(f"cannot write into {directory}: {existing} is not writable")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's first line (Pyro appends trace shapes below it), at most `limit` characters."""
    lines = str(error).strip().splitlines()
    return one_line(RuntimeError(lines[0]), limit) if lines else type(error).__name__


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line, at most `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as indented JSON at `path`, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_printed(path: Path, result: dict[str, Any]) -> None:
    """A result already printed, saved as JSON where that can be written; else a note on stderr
    that it was not (the result is not lost to a read-only run directory)."""
    try:
        write_json(path, result)
    except PyrovaeError as error:
        print(f"pyrovae: note: the result is printed above, not saved ({error})", file=sys.stderr)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold `directory`'s lock file while writing it: a second process is refused in one line.

    An advisory `flock`, released by the kernel when its process ends however it ends, so a
    killed run leaves no stale lock (the empty `.lock` file stays). Where there is no `fcntl`
    (Windows) nothing is locked.
    """
    if fcntl is None:
        yield
        return
    check_writable(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK, "a+")
    except OSError as error:
        raise PyrovaeError(f"cannot write into {directory}: {error.strerror or one_line(error)}") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise PyrovaeError(f"{directory} is in use by another pyrovae process (pid {holder}): wait for it to end, or choose another --out") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        except BaseException:
            if created and {p.name for p in directory.iterdir()} <= {LOCK}:  # nothing was written: leave nothing
                (directory / LOCK).unlink()
                directory.rmdir()
            raise
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
