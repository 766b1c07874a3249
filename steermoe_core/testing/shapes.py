"""Backbones at real shapes with random weights, built straight on the device, for benchmarks.

Random weights time like real ones; building on the device avoids minutes of CPU init for a 7B LLM.
"""

from __future__ import annotations

import torch
from torch import nn

WHISPER = {
    "tiny": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80),
    "base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80),
    "large-v3": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128),
}
LLM = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # SmolLM2-135M's width with 2 of its 30 layers and a 4,096-token vocabulary: the benchmarks' --smoke runs
    # (CI checks that the scripts run and print their figures, not the figures; the 49,152-row LM head
    # and its CTC read-out were half of the smoke run's time)
    "smoke": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=4096, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def random_whisper_encoder(name: str, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(**WHISPER[name], max_source_positions=1500, vocab_size=51866)
    cfg._attn_implementation = attn
    with torch.device(device):
        enc = WhisperEncoder(cfg).to(dtype)
    return enc.requires_grad_(False).eval()


def random_llm(name: str, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(LLM[name])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec, max_position_embeddings=32768)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return llm.requires_grad_(False).eval()
