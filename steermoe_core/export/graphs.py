"""The two exported graphs as plain modules over the model's own parts (no second implementation).

``AudioTower``: features + lengths -> audio tokens, through the encoder's ``forward_layers`` with
the adapter's steering hook, the final norm, pooling, the projector and (``vocab_posterior``) the
mixture of the LLM's embeddings: exactly ``encode_audio`` minus the feature front end (which the
backend computes in numpy).

``Decoder``: one step of the frozen LLM with an explicit KV cache, flattened to tensors so that
runtimes see ``past_key_i``/``past_value_i`` inputs and ``present_key_i``/``present_value_i``
outputs; only the last position's logits leave the graph (greedy decoding needs nothing else, and
a prompt's full (S x vocab) logits would dominate the prefill's cost).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from steermoe_core.model.steermoe import SteerMoEModel


class AudioTower(nn.Module):
    """Under ``drop_blank`` a second output, ``keep`` (B, T') bool, says which audio tokens the LLM
    reads (``Adapter.kept``); the backend drops the others, as ``SteerMoEModel.read_positions`` does."""

    def __init__(self, model: SteerMoEModel):
        super().__init__()
        self.encoder, self.adapter = model.encoder, model.adapter
        self.blank = model.ctc_blank_id
        # the LLM's embedding table enters the graph only where the adapter reads it (``vocab_posterior``, ``drop_blank``)
        p = model.cfg.projector
        self.vocab = model.llm.get_input_embeddings().weight if p.vocab_posterior or p.argmax_embeddings or p.drop_blank else None

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.encoder.forward_layers(features, feature_lengths, hook=self.adapter.layer_hook)
        x = self.adapter.after_encoder(x, mask)
        tokens = self.adapter.project(self.encoder.final_norm(x), mask)
        if self.vocab is None:
            return tokens
        logits = tokens @ self.vocab.T.to(tokens.dtype)  # once, for both
        inputs = self.adapter.llm_inputs(tokens, self.vocab, logits)
        return (inputs, self.adapter.kept(tokens, self.vocab, self.blank, logits)) if self.adapter.drop_blank else inputs


def frame_multiple(stride: int) -> int:
    """Feature frames are padded to a multiple of this (conv subsampling 2 x pooling stride), so the
    pooled length is F / multiple exactly and the graph needs no data-dependent padding branch."""
    return 2 * stride


def audio_tower_shapes(model: SteerMoEModel) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """Example inputs and dynamic axes: batch, and frames as ``multiple * k`` up to the encoder's window."""
    enc = model.encoder
    mult = frame_multiple(model.cfg.projector.stride)
    batch = Dim("batch", min=1, max=4096)
    k = Dim("frame_blocks", min=1, max=enc.max_frames // mult)
    feats = torch.zeros(2, enc.n_mels, 12 * mult)
    lengths = torch.tensor([12 * mult, 5 * mult + 3])
    return (feats, lengths), {"features": {0: batch, 2: mult * k}, "feature_lengths": {0: batch}}


def kv_shape(llm: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the LLM's cache."""
    c = llm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


class Decoder(nn.Module):
    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm
        self.layers = kv_shape(llm)[0]

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)], config=self.llm.config)
        out = self.llm.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        logits = self.llm.get_output_embeddings()(out.last_hidden_state[:, -1])
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


def decoder_shapes(llm: nn.Module, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Example inputs (a left-padded batch with a non-empty cache) and dynamic batch/seq/past axes."""
    layers, heads, head_dim = kv_shape(llm)
    b, s, p = 2, 5, 3
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, p:]
    embeds = torch.zeros(b, s, llm.config.hidden_size, dtype=dtype)
    past = [torch.zeros(b, heads, p, head_dim, dtype=dtype) for _ in range(2 * layers)]
    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=1 << 17)
    past_len, total = Dim("past", min=0, max=1 << 17), Dim("total", min=1, max=1 << 18)
    shapes = {
        "inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len}] * (2 * layers),
    }
    return (embeds, mask, pos, past), shapes
