"""The trainable part of SteerMoE: steering vectors, router, per-layer scales (docs/design.md#the-model).

    g   = softmax((h @ R.W[l] + R.b[l]) / temperature)     # (B, T, E), layer l's slice only
    x_l = h + s_l * (g @ V[l])

The router is one Linear(D, L*E), as in the paper; layer l multiplies only by its own E rows, so
the router costs L times less than computing all L*E logits at every layer and slicing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from steermoe_core.config import SteeringConfig


class SteeringMoE(nn.Module):
    """Steering for ``num_layers`` encoder layers of width ``dim``.

    ``placement="post_encoder"`` is the same module with ``num_layers=1`` applied once after the
    encoder; ``placement="none"`` builds no SteeringMoE at all.
    """

    def __init__(self, num_layers: int, dim: int, cfg: SteeringConfig):
        super().__init__()
        self.num_layers, self.num_experts, self.cfg = num_layers, cfg.num_experts, cfg
        self.vectors = nn.Parameter(torch.randn(num_layers, cfg.num_experts, dim) * cfg.vector_init_std)
        self.scales = nn.Parameter(torch.full((num_layers,), float(cfg.scale_init)))
        if cfg.router == "shared":
            self.router = nn.Linear(dim, num_layers * cfg.num_experts)
        else:
            self.router = nn.ModuleList(nn.Linear(dim, cfg.num_experts) for _ in range(num_layers))
        self.aux_loss: torch.Tensor | None = None
        # observer(layer, gates (B,T,E), steering delta (B,T,D), hidden h (B,T,D), mask (B,T) or None):
        # lets analysis see the router at work (``experiments.router_stats``) without touching the math
        self.observer: Callable[..., None] | None = None

    def reset_aux(self) -> None:
        self.aux_loss = None

    def router_logits(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Logits of ``layer``'s experts only: (B, T, E)."""
        if isinstance(self.router, nn.ModuleList):
            return self.router[layer](h)
        e = self.num_experts
        w = self.router.weight[layer * e : (layer + 1) * e]
        b = self.router.bias[layer * e : (layer + 1) * e]
        return F.linear(h, w, b)

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits / self.cfg.temperature
        if self.cfg.top_k and self.cfg.top_k < self.num_experts:
            kth = logits.topk(self.cfg.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, layer: int, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Steer one layer's output. ``mask`` (B, T) marks real frames, used only by the aux losses."""
        logits = self.router_logits(layer, h).float()
        g = self.gates(logits)
        steer = g.to(self.vectors.dtype) @ self.vectors[layer]
        if self.training and (self.cfg.load_balance_weight > 0 or self.cfg.z_loss_weight > 0):
            self._accumulate_aux(logits, g, mask)
        delta = self.scales[layer] * steer
        if self.observer is not None:
            self.observer(layer, g, delta, h, mask)
        return h + delta.to(h.dtype)

    def _accumulate_aux(self, logits: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        w = torch.ones(g.shape[:-1], device=g.device) if mask is None else mask.float()
        n = w.sum().clamp_min(1.0)
        loss = logits.new_zeros(())
        if self.cfg.load_balance_weight > 0:
            # Switch Transformer: E * sum_e (fraction routed to e) * (mean gate of e).
            top1 = F.one_hot(g.argmax(-1), self.num_experts).float()
            frac = (top1 * w[..., None]).sum((0, 1)) / n
            prob = (g * w[..., None]).sum((0, 1)) / n
            loss = loss + self.cfg.load_balance_weight * self.num_experts * (frac * prob).sum()
        if self.cfg.z_loss_weight > 0:
            z = torch.logsumexp(logits, dim=-1) ** 2
            loss = loss + self.cfg.z_loss_weight * (z * w).sum() / n
        loss = loss / self.num_layers
        self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss


def pool_frames(x: torch.Tensor, mask: torch.Tensor, stride: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every ``stride`` frames into one; padded frames never leak into a real token.

    Returns (B, ceil(T/stride), D or D*stride) and the pooled mask.
    """
    b, t, d = x.shape
    pad = (-t) % stride
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad))
    n = x.shape[1] // stride
    m = mask.view(b, n, stride).to(x.dtype)
    xs = x.view(b, n, stride, d)
    if mode == "avg":
        out = (xs * m[..., None]).sum(2) / m.sum(2, keepdim=True).clamp_min(1.0)
    elif mode == "max":
        out = xs.masked_fill(m[..., None] == 0, torch.finfo(x.dtype).min).amax(2)
        out = out * (m.sum(2, keepdim=True) > 0).to(x.dtype)
    elif mode == "stack":
        out = (xs * m[..., None]).reshape(b, n, stride * d)
    else:
        raise ValueError(f"unknown pooling {mode!r}")  # config validation makes this a programming error
    return out, m.amax(2) > 0


def pooled_lengths(frames: torch.Tensor, stride: int) -> torch.Tensor:
    """Audio tokens per clip for ``frames`` real encoder frames."""
    return (frames + stride - 1) // stride
