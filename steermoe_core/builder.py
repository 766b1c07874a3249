"""Assemble a SteerMoEModel from a recipe: load both frozen backbones, create a fresh adapter."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .encoders.whisper import load_whisper_encoder
from .llm import load_llm
from .model import SteerMoEModel
from .weights import quiet_transformers, resolve_dtype


def build_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> SteerMoEModel:
    quiet_transformers()
    if cfg.encoder.kind != "whisper":
        raise NotImplementedError(
            f"model.encoder.kind = {cfg.encoder.kind!r}: only 'whisper' is implemented in this release"
        )
    encoder = load_whisper_encoder(
        cfg.encoder.path, resolve_dtype(cfg.encoder.dtype, device), cfg.llm.attn_implementation
    )
    llm, tok = load_llm(cfg.llm, resolve_dtype(cfg.llm.dtype, device))
    torch.manual_seed(seed)  # the adapter's init is a function of the recipe's seed
    model = SteerMoEModel(encoder, llm, tok, cfg)
    return model.to(device)
