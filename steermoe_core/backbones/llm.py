"""The frozen causal LLM: any ``AutoModelForCausalLM`` from a hub id, a folder, or a .gguf file (whole or in parts)."""

from __future__ import annotations

import torch
from torch import nn

from steermoe_core.backbones.weights import (
    foreign_output_wanted,
    quiet_transformers,
    resolve_model_dir,
    split_parts,
)
from steermoe_core.config import LLMConfig
from steermoe_core.errors import BackboneError


def _transformers_output() -> None:
    """transformers' load reports and progress bars: hidden, unless ``--verbose`` asked for them."""
    quiet_transformers()
    if foreign_output_wanted():
        import transformers

        transformers.logging.set_verbosity_warning()
        transformers.utils.logging.enable_progress_bar()


def load_llm(cfg: LLMConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """(frozen model, tokenizer). GGUF weights are dequantised into a plain dense module.

    ``trust_remote_code`` is an argument, not read from ``cfg``: only the caller knows whether the
    recipe is the user's own or came inside a downloaded checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _transformers_output()
    parts = split_parts(cfg.path)  # a .gguf published in byte-parts is one GGUF once joined
    if len(parts) > 1 or parts[0].suffix == ".gguf":
        if not parts[0].is_file():
            raise BackboneError(f"{parts[0]}: no such GGUF file")
        from steermoe_core.backbones.gguf import load_gguf_llm

        model, tok = load_gguf_llm(parts, dtype, cfg.attn_implementation)
    else:
        folder = resolve_model_dir(cfg.path)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tok
