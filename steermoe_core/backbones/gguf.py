"""LLMs from llama.cpp's .gguf files, as plain dense HF modules.

transformers dequantises GGUF on load but leaves a GGUF quantizer attached, which refuses
``save_pretrained``. We rebuild the model from its config without ``quantization_config``, load the
dequantised state, and cache the result as an ordinary HF folder: the second load takes a second
instead of a dequantisation pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from steermoe_core.atomic import atomic_dir
from steermoe_core.backbones.weights import cache_root, file_key


def gguf_to_hf_folder(path: Path) -> Path:
    """Convert once into ``$STEERMOE_CACHE/gguf/<name>-<key>/`` and return that folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = cache_root() / "gguf" / f"{path.stem}-{file_key(path)}"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(quantised.state_dict(), strict=True)
    dense.generation_config = quantised.generation_config
    with atomic_dir(out) as tmp:
        dense.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def load_gguf_llm(path: Path, dtype: torch.dtype, attn_implementation: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_to_hf_folder(path)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model, tok
