"""Atomic writes: a run killed at any moment leaves either the old file/folder or the new one.

A write that fails (a full disk, a permission) removes its temporary and raises ``StorageError``
naming the final path: no 0-byte or half-written file is ever left under the real name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from steermoe_core.errors import storage_error


def _umask() -> int:
    """The process umask, read without changing it where Linux allows: setting it to read it back would,
    for that instant, give files other threads create no umask at all."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "wb") -> Iterator:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        _reraise_as_storage_error(e, path)
        raise
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a checkpoint or transcript is not a secret
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _reraise_as_storage_error(e, path)
        raise


def _reraise_as_storage_error(e: BaseException, path: Path) -> None:
    """A full disk or a permission becomes one line naming the file that could not be written
    (the old one, if any, is intact); anything else propagates unchanged."""
    err = storage_error(e, path)
    if err is not None:
        raise err from e


def write_text(path: Path | str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: Path | str, keep_existing: bool = False) -> Iterator[Path]:
    """Fill a temp folder beside ``path``; on success it replaces ``path`` in one rename.

    ``keep_existing``: for caches of a deterministic conversion. When several processes convert the
    same file at once (every rank of a torchrun job on one node, parallel test workers), the first to
    finish wins and the others drop their copy instead of swapping the folder out from under a
    process that is already loading from it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        _reraise_as_storage_error(e, path)
        raise
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would: teammates on a shared cluster can read it
        yield tmp
        if keep_existing:
            try:
                os.rename(tmp, path)  # atomic; fails when another process's copy is already there
            except OSError:
                if not path.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise_as_storage_error(e, path)
        raise
