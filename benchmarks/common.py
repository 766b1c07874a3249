"""Shared pieces of the speed benchmarks: model at any shape, LibriSpeech-shaped workloads, FLOPs."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steermoe_core.config import ModelConfig
from steermoe_core.data.batch import AudioBatch
from steermoe_core.encoders.whisper import WhisperAudioEncoder
from steermoe_core.model.steermoe import SteerMoEModel
from steermoe_core.runtime import prefer_shape_free_attention
from steermoe_core.testing.random_backbones import write_tokenizer
from steermoe_core.testing.shapes import random_llm, random_whisper_encoder

PROMPT = "Transcribe the audio."
TOKENS_PER_SECOND = 3.5  # LibriSpeech: about 3.5 target tokens per second of audio


def build(whisper: str, llm: str, device: torch.device, trim: bool, experts: int = 8, attn: str = "sdpa",
          cudnn_attention: bool = False) -> SteerMoEModel:
    """``cudnn_attention`` keeps torch's cuDNN attention on, for comparison; the product turns it off
    on CUDA (``runtime.prefer_shape_free_attention``), and so does the benchmark by default."""
    if not cudnn_attention:
        prefer_shape_free_attention(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    enc = WhisperAudioEncoder(random_whisper_encoder(whisper, device, dtype, attn), trim_padding=trim)
    lm = random_llm(llm, device, dtype, attn)
    tok = write_tokenizer(Path(tempfile.mkdtemp()))  # token ids only need to be < the LLM's vocab
    cfg = ModelConfig()
    cfg.encoder.trim_padding = trim
    cfg.steering.num_experts = experts
    torch.manual_seed(0)
    return SteerMoEModel(enc, lm, tok, cfg).to(device)


def librispeech_durations(n: int, seed: int = 0) -> np.ndarray:
    """Gamma-distributed like LibriSpeech train: mean 12.7 s, clipped to 1-30 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(shape=6.0, scale=12.7 / 6.0, size=n), 1.0, 30.0)


def target_text(tokens: int) -> str:
    return " the" * max(1, tokens)  # one token per word in the benchmark tokenizer


@dataclass
class Workload:
    batches: list[AudioBatch]
    samples: int
    audio_seconds: float


def librispeech_batches(n: int, batch_seconds: float, max_batch: int, device: torch.device, seed: int = 0) -> Workload:
    """Length-bucketed batches: sorted durations cut so padded seconds stay under ``batch_seconds``."""
    durs = sorted(librispeech_durations(n, seed))
    batches, cur = [], []
    for d in durs:
        if cur and (len(cur) == max_batch or (len(cur) + 1) * d > batch_seconds):
            batches.append(cur)
            cur = []
        cur.append(d)
    if cur:
        batches.append(cur)
    rng = np.random.default_rng(seed)
    rng.shuffle(batches)
    return Workload([make_batch(b, device, TOKENS_PER_SECOND) for b in batches], n, float(sum(durs)))


def reference_batches(n_batches: int, batch: int, device: torch.device, text_tokens: int = 448) -> Workload:
    """The reference's layout: every clip 30 s, text padded to 448 tokens."""
    bs = [make_batch([30.0] * batch, device, None, text_tokens) for _ in range(n_batches)]
    return Workload(bs, n_batches * batch, 30.0 * batch * n_batches)


def make_batch(durs: list[float], device: torch.device, tps: float | None, fixed_tokens: int = 0) -> AudioBatch:
    lengths = torch.tensor([int(d * 16000) for d in durs])
    waves = (torch.randn(len(durs), int(lengths.max())) * 0.1).pin_memory() if device.type == "cuda" else torch.randn(len(durs), int(lengths.max())) * 0.1
    targets = [target_text(int(round(d * tps)) if tps else fixed_tokens) for d in durs]
    return AudioBatch(waves=waves, lengths=lengths, prompts=[PROMPT] * len(durs), targets=targets)


def linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def step_flops(model: SteerMoEModel, batch: AudioBatch) -> float:
    """FLOPs a training step needs: forward, plus backward for activations only (the backbones are frozen).

    Linear layers: 2 per weight per token forward, 2 more backward (input gradients only).
    Attention core: 4*T^2*D forward (QK^T and PV; causal halves it), twice that backward.
    The encoder's first layer needs no backward (nothing below it trains). The LM head runs on target
    positions only.
    """
    enc, llm = model.encoder, model.llm
    d = enc.config.d_model
    n_layers = enc.config.encoder_layers
    per_enc_layer = linear_params(enc.layers[0])
    lb = model.layout.build(model.audio_token_counts(batch.lengths), batch.prompts, batch.targets, model.max_target_tokens)
    if model.cfg.encoder.trim_padding:
        frames = [((int(n) // 160) + 1) // 2 for n in batch.lengths]
    else:
        frames = [1500] * len(batch.lengths)
    total = 0.0
    for t in frames:
        lin = 2 * t * per_enc_layer
        att = 4 * t * t * d
        total += n_layers * (lin + att) + (n_layers - 1) * (lin + 2 * att)
        conv = 2 * (2 * t) * (enc.model.conv1.weight.numel()) + 2 * t * enc.model.conv2.weight.numel()
        total += conv
    h = llm.config.hidden_size
    per_llm_layer = linear_params(llm.base_model.layers[0])
    for row in lb.attention_mask:
        s = int(row.sum())
        lin = 2 * s * per_llm_layer
        att = 2 * s * s * h  # causal
        total += llm.config.num_hidden_layers * (2 * lin + 3 * att)
    n_tgt = len(lb.target_labels)
    total += 4 * n_tgt * h * llm.config.vocab_size
    return total
