"""The exported ONNX folder's contract: what `steermoe export --onnx` writes and the onnxruntime backend reads.

    DIR/manifest.json        format + version, shapes, prompt pieces, generation settings
    DIR/audio_tower.onnx     log-mel features (B, n_mels, F) + lengths -> audio tokens (B, F/(2k), H)
    DIR/decoder.onnx         inputs_embeds + attention_mask + position_ids + past k/v -> last logits + present k/v
    DIR/embeddings.npy       the LLM's token embedding table (prompts are embedded without torch)
    DIR/mel_filters.npy      Whisper's mel filter bank (the front end runs in numpy)
    DIR/tokenizer/           the LLM's tokenizer (tokenizer.json is what the backend reads)

An export in ``--backend auto``'s cache (``export.cache``) is the same folder; its decoder, embeddings
and tokenizer are hard links to one copy per frozen LLM, which its manifest names in ``shared_llm``
(readers need not look at it: every file is in the folder).

Nothing here imports torch or onnx: reading a folder must work with onnxruntime + numpy alone.
``FORMAT_VERSION`` changes whenever a graph's inputs/outputs or a manifest key change meaning; a
runtime refuses any other version rather than guess.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from steermoe_core.errors import CheckpointError, MissingDependency

FORMAT = "steermoe-onnx"
FORMAT_VERSION = 2  # 2: the audio tower may output `keep` (manifest audio.drop_blank)
MANIFEST = "manifest.json"
PROMPT_MARK = "STEERMOEPROMPTMARK"  # where the prompt goes in the rendered text after the audio
INSTALL_HINT = 'pip install "steermoe[onnx]"'


def cache_names(layers: int, prefix: str) -> list[str]:
    """The decoder's cache inputs (``past``) or outputs (``present``), in graph order."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def require(*modules: str) -> None:
    """Import the optional ONNX dependencies up front, so a missing one is one line, not a traceback."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingDependency(f"{name} is not installed: {INSTALL_HINT}") from None


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an exported folder, refusing anything this version cannot run."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (a checkpoint: run `steermoe export CKPT --onnx --out DIR` first, or use --backend torch)" if (
            folder / "adapter.safetensors").is_file() else ""
        raise CheckpointError(f"{folder}: not an exported ONNX folder (no {MANIFEST}){hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a steermoe ONNX manifest (format is {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        made = manifest.get("steermoe_version", "?")
        raise CheckpointError(
            f"{path}: exported in format version {version} (steermoe {made}); this steermoe reads version "
            f"{FORMAT_VERSION}: export the checkpoint again with this version"
        )
    missing = [name for name in manifest["files"].values() if not (folder / name).exists()]
    if missing:
        raise CheckpointError(f"{folder}: incomplete export (missing {', '.join(missing)})")
    return manifest
