"""The frozen causal LLM: any ``AutoModelForCausalLM`` from a hub id, a folder, or a .gguf file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import LLMConfig
from .weights import quiet_transformers, resolve_model_dir, resolve_path


def load_llm(cfg: LLMConfig, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """(frozen model, tokenizer). GGUF weights are dequantised into a plain dense module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    p = Path(resolve_path(cfg.path)).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such GGUF file")
        from .gguf_llm import load_gguf_llm

        model, tok = load_gguf_llm(p, dtype, cfg.attn_implementation)
    else:
        folder = resolve_model_dir(cfg.path)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tok
