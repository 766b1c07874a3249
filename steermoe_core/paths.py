"""Where steermoe keeps what it builds and downloads, without importing torch (a torch-free
command, such as `infer --backend onnxruntime`, asks too)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where converted backbones (CTranslate2, GGUF), ONNX exports and the demo live: $STEERMOE_CACHE or ~/.cache/steermoe."""
    return Path(os.environ.get("STEERMOE_CACHE", Path.home() / ".cache" / "steermoe"))
