"""Naming and locking what the export cache holds: an export's key (a hash of its checkpoint's own
files and the export format) and the file locks that make concurrent first uses export once. Kept
apart from ``cache`` so the exporter (``onnx_export``), which names and locks the shared LLM parts,
and the cache that calls it depend on it and not on each other."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from steermoe_core.inference.onnx_manifest import FORMAT_VERSION

_KEY_FILES = ("adapter.safetensors", "recipe.toml", "meta.json")
CACHE_REVISION = 4  # raised when what an export holds changes within one format version (3: the long-recording policy's inputs; 4: the LLM as released beside a LoRA-folded decoder)


def export_key(checkpoint: Path) -> str:
    """A hash of the checkpoint's own files and the export format: what the cached export depends on."""
    h = hashlib.sha256(f"steermoe-onnx-v{FORMAT_VERSION}.{CACHE_REVISION}".encode())
    for name in _KEY_FILES:
        path = Path(checkpoint) / name
        if path.is_file():
            h.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def beside(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


@contextlib.contextmanager
def locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing); with ``wait=False`` yields False at
    once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
