"""The trainable part of SteerMoE, in one module: steering + pooling + projector.

Everything a checkpoint stores, an optimizer updates or a parameter table counts lives here; the
frozen backbones around it are never saved. ``placement`` selects the paper's ablations:
``layer_wise`` (SteerMoE: steering after every encoder layer), ``post_encoder`` (one steering MoE
after the last layer) and ``none`` (a linear adapter only).
"""

from __future__ import annotations

import torch
from torch import nn

from steermoe_core.config import ModelConfig
from steermoe_core.encoders.base import LayerHook
from steermoe_core.model.steering import SteeringMoE, pool_frames

GROUPS = ("steering_vectors", "router", "scales", "projector")


class Adapter(nn.Module):
    """Steering for an encoder of ``num_layers`` x ``dim``, pooled and projected to an LLM of width ``hidden``."""

    def __init__(self, num_layers: int, dim: int, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.placement, self.pooling, self.stride = cfg.steering.placement, cfg.projector.pooling, cfg.projector.stride
        self.vocab_posterior, self.drop_blank = cfg.projector.vocab_posterior, cfg.projector.drop_blank
        self.argmax_embeddings = cfg.projector.argmax_embeddings
        n = num_layers if self.placement == "layer_wise" else 1
        self.steering = None if self.placement == "none" else SteeringMoE(n, dim, cfg.steering)
        self.projector = nn.Linear(dim * self.stride if self.pooling == "stack" else dim, hidden)

    @property
    def layer_hook(self) -> LayerHook | None:
        """What the encoder calls after each layer (SteerMoE), or None."""
        return self.steering if self.placement == "layer_wise" else None

    def after_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Steering after the last layer, for ``placement = "post_encoder"`` (identity otherwise)."""
        return self.steering(0, x, mask) if self.placement == "post_encoder" else x

    def project(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-normed (B, T, D) frames -> (B, ceil(T/k), H) audio tokens (what the CTC loss reads)."""
        pooled, _ = pool_frames(z, mask, self.stride, self.pooling)
        return self.projector(pooled)

    def llm_inputs(self, tokens: torch.Tensor, vocab: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """What the LLM reads for each audio token: the token itself, or (``vocab_posterior``) the
        mixture of the LLM's (V, H) input embeddings ``vocab`` under softmax(token . vocab), or
        (``argmax_embeddings``) the embedding of the word piece that mixture peaks on.

        The idea (LegoSLM): a frozen LLM has only ever read its own embeddings, and a mixture of them
        peaked on the word the CTC loss found reads like text, where a raw projected vector is an input
        it must first learn to read. Measured on the demo it learned no faster (README: *The offline
        demo*), so it is an option, off by default. The softmax runs in fp32. ``logits``: tokens . vocab
        where the caller has them already.
        """
        if not (self.argmax_embeddings or self.vocab_posterior):
            return tokens
        logits = tokens @ vocab.T.to(tokens.dtype) if logits is None else logits
        if self.argmax_embeddings:  # the nearest word piece's own embedding: text, as a text-trained reader knows it
            return vocab[logits.argmax(-1)].to(tokens.dtype)
        return logits.float().softmax(-1).to(tokens.dtype) @ vocab.to(tokens.dtype)

    @torch.no_grad()
    def kept(self, tokens: torch.Tensor, vocab: torch.Tensor, blank: int, logits: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T', H) audio tokens -> (B, T') bool: which ones the LLM reads under ``drop_blank``
        (all of them otherwise). A token is dropped where its nearest word piece (the CTC read-out's
        argmax) is ``blank``, or is the same as the previous token's: the CTC collapse, so a clip
        costs the LLM one position per word piece heard. Padding rows are the caller's to ignore.
        ``logits``: tokens . vocab where the caller has them already (the CTC loss's)."""
        if not self.drop_blank:
            return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ids = (tokens @ vocab.T.to(tokens.dtype) if logits is None else logits).argmax(-1)
        new = torch.ones_like(ids, dtype=torch.bool)
        new[:, 1:] = ids[:, 1:] != ids[:, :-1]
        return new & (ids != blank)

    @torch.no_grad()
    def init_projector(self, target_rms: float) -> None:
        """Start audio tokens at the loudness of the LLM's own token embeddings.

        The encoder's layer-normed output has unit scale; PyTorch's default init would make audio
        tokens several times louder than text tokens (SmolLM2's embeddings have RMS 0.14), and the
        adapter would spend its first hundreds of steps just turning them down.
        """
        self.projector.weight.normal_(0.0, target_rms / self.projector.in_features**0.5)
        self.projector.bias.zero_()

    def reset_aux(self) -> None:
        if self.steering is not None:
            self.steering.reset_aux()

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return None if self.steering is None else self.steering.aux_loss

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups so each can take its own learning rate (and be counted apart)."""
        groups = {"projector": list(self.projector.parameters())}
        if self.steering is not None:
            groups["steering_vectors"] = [self.steering.vectors]
            groups["router"] = list(self.steering.router.parameters())
            groups["scales"] = [self.steering.scales]
        return groups

    def parameter_counts(self) -> dict[str, int]:
        counts = {k: sum(p.numel() for p in ps) for k, ps in self.parameter_groups().items()}
        out = {k: counts.get(k, 0) for k in GROUPS}
        out["total"] = sum(out.values())
        return out

    def load_checked(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapter weights, refusing missing, unexpected or mis-shaped tensors with one line."""
        from steermoe_core.errors import CheckpointError

        own = self.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise CheckpointError(f"adapter weights do not match the recipe (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"adapter weight {k}: shape {tuple(v.shape)} but the recipe builds {tuple(own[k].shape)}")
        self.load_state_dict(state)


def count_adapter_parameters(num_layers: int, dim: int, hidden: int, cfg: ModelConfig) -> dict[str, int]:
    """The parameter breakdown for any backbone shapes, without loading a backbone (meta tensors)."""
    with torch.device("meta"):
        return Adapter(num_layers, dim, hidden, cfg).parameter_counts()
