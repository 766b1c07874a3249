"""The errors a user can cause. The CLI prints these as one line; anything else keeps its traceback.

Every user-facing error subclasses ``SteermoeError``. Nothing else is caught: a shape bug or an
out-of-memory is a programming or capacity problem whose traceback the user (or we) need.
This module imports nothing from the package, so every layer can raise these.
"""

from __future__ import annotations

import errno


class SteermoeError(Exception):
    """Bad input: a one-line message that names the file, key or option and what is wrong."""


class UsageError(SteermoeError):
    """A command-line combination that cannot work."""


class TrainingError(SteermoeError):
    """A run that cannot go on (e.g. too many non-finite losses); its last good checkpoint is kept."""


class RecipeError(SteermoeError):
    """A recipe problem, phrased as one line that names the offending key."""


class DataError(SteermoeError):
    """A dataset problem, phrased as one line naming the folder or file."""


class AudioError(SteermoeError):
    """One line naming the audio file and what is wrong with it."""


class SourceError(SteermoeError):
    """A corpus folder for `steermoe prep` that is not laid out as expected."""


class CheckpointError(SteermoeError):
    """One line naming the checkpoint and what is wrong with it."""


class BackboneError(SteermoeError):
    """A backbone (encoder or LLM) that cannot be found or read."""


class DeviceError(SteermoeError):
    """A device or precision the machine cannot provide."""


class ModelNotFound(SteermoeError):
    """No --model, no STEERMOE_MODEL and no demo checkpoint: says how to get one."""


class MissingDependency(SteermoeError):
    """An optional package a feature needs is not installed: says which extra to install."""


class StorageError(SteermoeError, OSError):
    """A file the OS would not let steermoe write or read: a full disk, a permission, a read-only mount.
    Also an ``OSError``, so code that handled the OS's own error still handles this one."""


# OS errors that are the user's machine, not steermoe's code: one line naming the path, not a traceback
_OS_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
# how libraries that hide the errno report a write that ran out of room (torch.save's zip writer, safetensors)
_FULL_DISK_TEXT = ("No space left on device", "os error 28", "unexpected pos", "PytorchStreamWriter failed writing",
                   "file write failed")


def storage_error(e: BaseException, path: object = None) -> StorageError | None:
    """The one-line error for ``e`` when the machine, not the code, caused it (else None). ``path``:
    the file or folder being written (the final name, not a temporary one); else the error's own."""
    if isinstance(e, OSError) and e.errno in _OS_CAUSES:
        where = path if path is not None else (e.filename if e.filename is not None else "a file")
        return StorageError(f"{where}: {_OS_CAUSES[e.errno]}")
    if path is not None and not isinstance(e, OSError) and isinstance(e, Exception):
        text = str(e)
        if any(t in text for t in _FULL_DISK_TEXT):
            first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
            return StorageError(f"{path}: could not be written: no space left on the device ({first})")
    return None


def decode_error_text(e: UnicodeDecodeError, path: object, expected: str = "UTF-8") -> str:
    """``PATH: not UTF-8 text (byte 0xe9 at offset 6)``: which file, where, and what was expected."""
    bad = e.object[e.start : e.start + 1] if isinstance(e.object, (bytes, bytearray)) else b""
    byte = f"byte 0x{bad[0]:02x} " if bad else ""
    return f"{path}: not {expected} text ({byte}at byte offset {e.start}); {expected} expected"
