"""The export cache behind ``--backend auto``: each checkpoint exported once, its frozen LLM once per LLM.

Layout, under ``$STEERMOE_CACHE/onnx/``::

    <checkpoint>-<key>/       one checkpoint's export: the folder `steermoe export --onnx` writes, complete
    <checkpoint>-<key>.lock   held while that export is checked or built
    <checkpoint>-<key>.failed why its export failed (``backend_for`` then stays on torch until it is deleted)
    llm/<llm key>/            the LLM's part of an export, shared: decoder.onnx (+ .data), embeddings.npy, tokenizer/
    llm/<llm key>.lock        held while that part is exported, linked into an export, or pruned

Why: nearly all of an export's time (about a minute on 2 cores for SmolLM2-135M) and disk (0.6 of
its 0.7 GB) is the frozen LLM's decoder graph, the same for every adapter trained on that LLM. The
first export for an LLM writes its part to ``llm/<llm key>/``; every export (that one included)
hard-links those files into its own folder, so another adapter on the same LLM exports only its
audio tower (seconds) and the decoder is stored once on disk however many exports use it.

Hard links rather than a manifest naming a path elsewhere: a cached export stays the self-contained
folder that `steermoe export --onnx --out DIR` writes (same files, same manifest format: the
onnxruntime backend reads one layout, and a copy of the folder runs anywhere), and removing one
export or a shared part never takes a file from under another export (the file lives while any
link does). Where the file system refuses a hard link the file is copied: correct, just not shared
on disk.

Keys: ``<key>`` hashes the checkpoint's own files and the export format (``export_key``), so
retraining into the same folder makes a new export and never reuses a stale one. ``<llm key>``
(``onnx_export.llm_key``) hashes what the LLM part is made of: the export format, opset, dtype and
quantisation, the LLM's config, the full bytes of its weights as loaded (a GGUF dequantised, LoRA
folded in) and its tokenizer. A checkpoint with LoRA on the LLM also mixes in its own ``<key>``:
its folded-in LLM is its own, and it keeps its own decoder; the LLM as released, which it runs for
prompts without audio, is linked from that LLM's shared part (``shared_base_llm`` in its manifest).

Concurrency: one checkpoint's export is built under its lock (concurrent callers wait and then find
it); an LLM part is exported, and linked into an export whose manifest is renamed into place, under
the LLM's lock, so two adapters on a new LLM exported at once export its decoder once. Every folder
is written to a temporary name and renamed into place (``atomic.atomic_dir``).

Pruning: the newest ``$STEERMOE_ONNX_CACHE_KEEP`` checkpoint exports (default 3) are kept; an LLM part
goes when no export left in the cache names it (manifest key ``shared_llm``), checked under its lock.
A process already running a pruned export keeps its open files (POSIX), and a later call exports it
again (its LLM part reused when it is still there, exported again cleanly when not).

Importing this module never imports torch: ``inference.choice`` asks it for paths before deciding
whether anything must be exported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from steermoe_core.errors import CheckpointError
from steermoe_core.export.keys import beside, export_key, locked
from steermoe_core.inference.onnx_manifest import MANIFEST, read_manifest
from steermoe_core.paths import cache_root

LLM_PARTS = "llm"  # the shared LLM parts' folder inside the cache


def cache_dir() -> Path:
    """``$STEERMOE_CACHE/onnx``."""
    return cache_root() / "onnx"


def cache_folder(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint).resolve()
    return cache_dir() / f"{checkpoint.name}-{export_key(checkpoint)}"


def failed_marker(checkpoint: Path) -> Path:
    """Where a failed export of ``checkpoint`` leaves its reason (so it is not retried on every call)."""
    return beside(cache_folder(checkpoint), ".failed")


def cached_export(checkpoint: Path, say: Callable[[str], None] = print) -> Path:
    """The checkpoint's export in the cache, built under a lock the first time (concurrent callers wait
    for it); its LLM part comes from ``llm/`` when another export already made it."""
    from steermoe_core.export import onnx_export  # torch: only when something may have to be exported

    folder = cache_folder(checkpoint)
    with locked(beside(folder, ".lock")):
        if not _complete(folder):
            say(f"exporting {checkpoint} to onnxruntime once (cached in {folder.parent}; a minute or more on 2 cores "
                "for a new LLM, twice that with LoRA on it, seconds for another adapter on an LLM exported before)")
            with warnings.catch_warnings():  # the exporter's and transformers' deprecation chatter
                warnings.simplefilter("ignore")
                onnx_export.export_onnx(checkpoint, folder, step=lambda msg: say(f"  {msg}"), llm_cache=folder.parent / LLM_PARTS)
        os.utime(folder)  # most recently used: kept by _prune
    _prune(folder.parent, keep=int(os.environ.get("STEERMOE_ONNX_CACHE_KEEP", "3")), spare=folder)
    return folder


def _complete(folder: Path) -> bool:
    """An export whose manifest and every file it names are there (a file deleted by hand: export again)."""
    try:
        read_manifest(folder)
    except (CheckpointError, KeyError, TypeError, AttributeError):  # the latter: a damaged manifest
        return False
    return True


def _prune(root: Path, keep: int, spare: Path) -> None:
    """Drop all but the ``keep`` most recently used exports (never ``spare``, nor one another process
    holds the lock of), then every shared LLM part that no export left in the cache names."""
    exports = sorted(_exports(root), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in exports[max(keep, 1):]:
        if old == spare:
            continue
        with locked(beside(old, ".lock"), wait=False) as mine:
            if mine:
                shutil.rmtree(old, ignore_errors=True)
        if mine:
            beside(old, ".lock").unlink(missing_ok=True)
    parts = root / LLM_PARTS
    if not parts.is_dir():
        return
    for part in [p for p in parts.iterdir() if p.is_dir() and not p.name.startswith(".")]:
        if part.name in _shared_llms(root):
            continue
        with locked(beside(part, ".lock"), wait=False) as mine:
            # under the lock an export linking this part has renamed its manifest into place: ask again
            if mine and part.name not in _shared_llms(root):
                shutil.rmtree(part, ignore_errors=True)


def _exports(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()] if root.is_dir() else []


def _shared_llms(root: Path) -> set[str]:
    """The LLM parts the exports in the cache name."""
    keys = set()
    for folder in _exports(root):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            keys.update(str(manifest[k]) for k in ("shared_llm", "shared_base_llm") if manifest.get(k))
    return keys
