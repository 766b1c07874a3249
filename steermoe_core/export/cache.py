"""The default backend: on a CPU, a checkpoint runs on onnxruntime from an export built once and cached.

Why: on a CPU the exported graphs decode the same greedy text as PyTorch, faster at every batch size
(benchmarks/RESULTS.md), because onnxruntime runs the small LLM's per-token work as fused kernels
that PyTorch dispatches op by op. An export costs about a minute of CPU and under a GB of disk per
checkpoint of the shipped size, once: ``backend_for`` builds it on first use into
``$STEERMOE_CACHE/onnx/<checkpoint>-<key>/``, keyed by the checkpoint's own files, so retraining
into the same folder makes a new export and never reuses a stale one. The newest
``$STEERMOE_ONNX_CACHE_KEEP`` exports (default 3) are kept.

``auto`` stays on torch where onnxruntime would not help or cannot follow: a GPU, beam search, a
Conformer encoder (not exportable), LoRA on the LLM (an export folds it into the weights, and text-only
prompts must run the LLM without it), a missing ``[onnx]`` extra, or an export that failed before
(remembered, with its reason, so a failing export is not retried on every call).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from steermoe_core.backbones.weights import cache_root
from steermoe_core.errors import SteermoeError
from steermoe_core.inference.onnx_manifest import FORMAT_VERSION, MANIFEST

BACKENDS = ("auto", "torch", "onnxruntime")
_KEY_FILES = ("adapter.safetensors", "recipe.toml", "meta.json")
CACHE_REVISION = 3  # raised when what an export holds changes within one format version (3: the long-recording policy's inputs)


def is_export(path: Path) -> bool:
    """A folder written by `steermoe export --onnx` (rather than a checkpoint)."""
    return (Path(path) / MANIFEST).is_file() and not (Path(path) / "recipe.toml").is_file()


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


def cache_folder(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint).resolve()
    return cache_root() / "onnx" / f"{checkpoint.name}-{export_key(checkpoint)}"


def why_torch(checkpoint: Path, device: str, num_beams: int = 1) -> str | None:
    """Why ``auto`` decodes ``checkpoint`` with torch here, or None when onnxruntime fits."""
    from steermoe_core.config import load_recipe
    from steermoe_core.runtime import pick_device

    if pick_device(device).type != "cpu":
        return "a GPU"
    if num_beams != 1:
        return "beam search"
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed; pip install 'steermoe[onnx]' for the faster onnxruntime backend"
    recipe = load_recipe(Path(checkpoint) / "recipe.toml")
    if recipe.model.encoder.kind != "whisper":
        return "only Whisper encoders export to ONNX"
    if recipe.model.llm.lora is not None:
        return "LoRA on the LLM: an export folds it in, and prompts without audio need the LLM without it"
    failed = _beside(cache_folder(checkpoint), ".failed")
    if failed.is_file():
        return f"its onnxruntime export failed before ({failed.read_text().splitlines()[0]}; delete {failed} to try again)"
    return None


def backend_for(
    model: Path, backend: str, device: str, num_beams: int = 1, say: Callable[[str], None] = print
) -> tuple[Path, str]:
    """(path to load, backend name) for `infer` and `serve`: ``auto`` is onnxruntime on a CPU (an
    exported folder as given; a checkpoint through its cached export, built here the first time) and
    torch elsewhere; ``torch`` / ``onnxruntime`` are taken as asked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    model = Path(model)
    if backend != "auto":
        return model, backend
    if is_export(model):
        return model, "onnxruntime"
    if not (model / "recipe.toml").is_file():
        return model, "torch"  # not a checkpoint: loading it says what is wrong, in one line
    reason = why_torch(model, device, num_beams)
    if reason is not None:
        say(f"backend: torch ({reason})")
        return model, "torch"
    folder = cache_folder(model)
    try:
        folder = cached_export(model, say)
    except KeyboardInterrupt:
        raise
    except (SteermoeError, OSError) as e:  # a full disk, an unwritable cache: this run on torch, the next one tries again
        say(f"backend: torch (no onnxruntime export: {e})")
        return model, "torch"
    except Exception as e:  # the exporter's own failure: decode with torch rather than not at all, and remember why
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        with contextlib.suppress(OSError):
            _beside(folder, ".failed").write_text(f"{type(e).__name__}: {first}\n\n{traceback.format_exc()}")
        say(f"backend: torch (the onnxruntime export failed: {type(e).__name__}: {first})")
        return model, "torch"
    say(f"backend: onnxruntime ({folder}; --backend torch skips it)")
    return folder, "onnxruntime"


def cached_export(checkpoint: Path, say: Callable[[str], None] = print) -> Path:
    """The checkpoint's export in the cache, built under a lock the first time (concurrent callers wait for it)."""
    from steermoe_core.export.onnx_export import export_onnx

    folder = cache_folder(checkpoint)
    with _locked(_beside(folder, ".lock")):
        if not (folder / MANIFEST).is_file():
            say(f"exporting {checkpoint} to onnxruntime once (about a minute on 2 cores; cached in {folder.parent})")
            with warnings.catch_warnings():  # the exporter's and transformers' deprecation chatter
                warnings.simplefilter("ignore")
                export_onnx(checkpoint, folder, step=lambda msg: say(f"  {msg}"))
        os.utime(folder)  # most recently used: kept by _prune
    _prune(folder.parent, keep=int(os.environ.get("STEERMOE_ONNX_CACHE_KEEP", "3")), spare=folder)
    return folder


def _beside(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prune(root: Path, keep: int, spare: Path) -> None:
    """Drop all but the ``keep`` most recently used exports (never ``spare``); a process already
    running one keeps its open files (POSIX), and a later call simply exports it again."""
    exports = sorted((p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in exports[max(keep, 1):]:
        if old != spare:
            shutil.rmtree(old, ignore_errors=True)
            _beside(old, ".lock").unlink(missing_ok=True)
