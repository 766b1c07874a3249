"""Assemble a SteerMoEModel from a recipe: load both frozen backbones, create a fresh adapter, and
inject LoRA into the backbones when the recipe has ``[model.encoder.lora]`` / ``[model.llm.lora]``."""

from __future__ import annotations

import torch

from steermoe_core.backbones.llm import load_llm
from steermoe_core.backbones.weights import quiet_transformers
from steermoe_core.config import ModelConfig
from steermoe_core.encoders import load_encoder
from steermoe_core.model.lora import attach_lora
from steermoe_core.model.steermoe import SteerMoEModel
from steermoe_core.runtime import prefer_shape_free_attention, weights_dtype


def build_model(cfg: ModelConfig, device: torch.device, seed: int = 0, trust_remote_code: bool = False) -> SteerMoEModel:
    """``trust_remote_code`` comes from the caller (the user's flag or own recipe), never from a checkpoint."""
    quiet_transformers()
    prefer_shape_free_attention(device)
    enc = cfg.encoder
    encoder = load_encoder(
        enc.kind, enc.path, dtype=weights_dtype(enc.dtype, device),
        attn_implementation=cfg.llm.attn_implementation, trim_padding=enc.trim_padding,
    )
    llm, tok = load_llm(cfg.llm, weights_dtype(cfg.llm.dtype, device), trust_remote_code)
    torch.manual_seed(seed)  # the adapter's init is a function of the recipe's seed
    model = SteerMoEModel(encoder, llm, tok, cfg)
    attach_lora(model)
    return model.to(device)
