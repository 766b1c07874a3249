"""Which backend runs a model for `infer` and `serve`: ``--backend auto``'s rules.

Why: on a CPU the exported graphs decode the same greedy text as PyTorch, faster at every batch size
(benchmarks/RESULTS.md), because onnxruntime runs the small LLM's per-token work as fused kernels
that PyTorch dispatches op by op. So ``auto`` is onnxruntime on a CPU: an exported folder as given,
a checkpoint through its cached export (``export.cache``: built on first use, the frozen LLM's
decoder shared by every adapter on that LLM), and torch elsewhere.

``auto`` stays on torch where onnxruntime would not help or cannot follow: a GPU, beam search, a
Conformer encoder (not exportable), a missing ``[onnx]`` extra, or an export that failed before
(remembered, with its reason, so a failing export is not retried on every call). LoRA on the LLM
exports too: folded into the decoder that reads audio, with the LLM as released beside it for prompts
without audio.

Importing this module never imports torch (the onnxruntime backend's promise); the rules import what
they need when they run, and the export code only when a checkpoint must be exported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import traceback
from collections.abc import Callable
from pathlib import Path

from steermoe_core.errors import SteermoeError
from steermoe_core.inference.onnx_manifest import MANIFEST

BACKENDS = ("auto", "torch", "onnxruntime")


def is_export(path: Path) -> bool:
    """A folder written by `steermoe export --onnx` (rather than a checkpoint)."""
    return (Path(path) / MANIFEST).is_file() and not (Path(path) / "recipe.toml").is_file()


def why_torch(checkpoint: Path, device: str, num_beams: int = 1) -> str | None:
    """Why ``auto`` decodes ``checkpoint`` with torch here, or None when onnxruntime fits."""
    from steermoe_core.config import load_recipe
    from steermoe_core.export.cache import failed_marker

    if device != "cpu":  # "cpu" needs no torch to tell; anything else asks it
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
    failed = failed_marker(checkpoint)
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
    from steermoe_core.export.cache import cached_export, failed_marker

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
            failed_marker(model).write_text(f"{type(e).__name__}: {first}\n\n{traceback.format_exc()}")
        say(f"backend: torch (the onnxruntime export failed: {type(e).__name__}: {first})")
        return model, "torch"
    say(f"backend: onnxruntime ({folder}; --backend torch skips it)")
    return folder, "onnxruntime"
