"""`steermoe analyze`: what a trained router does, over a dataset.

For every steered layer, over all real (unpadded) encoder frames: the mean gate weight of each
expert, how often each expert is the top choice, the entropy of the gate distribution (log E =
uniform, 0 = one expert), and the norm of the steering added (``s_l * g @ V_l``), also relative to
the hidden state's norm. The same figures per prompt show whether tasks route differently (the
router sees only audio, so a difference between prompts comes from their audio).

Gates are captured through ``SteeringMoE.observer``; the model computes exactly what it always does.
Only the audio side runs (encoder + steering): the LLM is not needed for these figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from steermoe_core.data.dataset import ShardedDataset, make_loader
from steermoe_core.data.sampler import length_bucketed_batches
from steermoe_core.errors import UsageError
from steermoe_core.evaluation.evaluate import pick_examples
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.runtime import autocast, resolve_precision


class _Totals:
    """Running sums for one group of examples (float64, on the host)."""

    def __init__(self, layers: int, experts: int):
        self.gate = torch.zeros(layers, experts, dtype=torch.float64)
        self.top1 = torch.zeros(layers, experts, dtype=torch.float64)
        self.entropy = torch.zeros(layers, dtype=torch.float64)
        self.norm = torch.zeros(layers, dtype=torch.float64)
        self.hidden = torch.zeros(layers, dtype=torch.float64)
        self.frames = torch.zeros(layers, dtype=torch.float64)
        self.examples = 0

    def add(self, layer: int, g: torch.Tensor, delta: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        """``g`` (N, T, E) gates, ``delta``/``h`` (N, T, D), ``w`` (N, T) 1 for real frames."""
        g, w = g.double(), w.double()
        self.gate[layer] += torch.einsum("nte,nt->e", g, w).cpu()
        top = torch.nn.functional.one_hot(g.argmax(-1), g.shape[-1]).double()
        self.top1[layer] += torch.einsum("nte,nt->e", top, w).cpu()
        ent = -(g * g.clamp_min(1e-30).log()).sum(-1)
        self.entropy[layer] += (ent * w).sum().cpu()
        self.norm[layer] += (delta.double().norm(dim=-1) * w).sum().cpu()
        self.hidden[layer] += (h.double().norm(dim=-1) * w).sum().cpu()
        self.frames[layer] += w.sum().cpu()

    def summary(self, scales: list[float]) -> list[dict]:
        n = self.frames.clamp_min(1.0)
        e = self.gate.shape[1]
        return [
            {
                "layer": i, "scale": scales[i],
                "mean_gate": (self.gate[i] / n[i]).tolist(),
                "top1_frequency": (self.top1[i] / n[i]).tolist(),
                "entropy": float(self.entropy[i] / n[i]), "max_entropy": math.log(e),
                "steering_norm": float(self.norm[i] / n[i]), "hidden_norm": float(self.hidden[i] / n[i]),
                "relative_steering": float(self.norm[i] / self.hidden[i].clamp_min(1e-12)),
            }
            for i in range(self.gate.shape[0])
        ]


@torch.no_grad()
def router_statistics(
    checkpoint: str | Path,
    data: str | Path,
    max_examples: int = 0,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Router figures of ``checkpoint`` over the prepared set ``data`` (all of it, or a seeded
    sample of ``max_examples``), overall and per prompt. ``overrides``: ``key=value`` changes to
    the checkpoint's recipe (``eval.batch_size``, ``model.encoder.trim_padding``)."""
    model, recipe, meta = load_checkpoint(checkpoint, device, overrides)
    steering = model.steering
    if steering is None:
        raise UsageError(f"{checkpoint}: this adapter has no router (model.steering.placement = 'none')")
    ds = ShardedDataset(data)
    chosen = pick_examples(len(ds), max_examples, recipe.train.seed)
    batches = length_bucketed_batches(ds, recipe.eval.batch_size, shuffle=False, only=set(chosen) if chosen else None)
    precision = resolve_precision(recipe.train.precision, model.device)
    layers, experts = steering.num_layers, steering.num_experts
    overall, by_prompt = _Totals(layers, experts), {}
    rows: dict[str, list[int]] = {}

    real = torch.zeros(0)  # (B,) audio frames of the batch being encoded

    def observe(layer, g, delta, h, mask):
        # real audio frames only: not the mask, which counts every frame of Whisper's padded 30 s
        # layout (trim_padding = false) as real, so figures would be mostly about padding
        w = (torch.arange(g.shape[1]) < real[:, None]).to(g.device, torch.float32)
        overall.add(layer, g, delta, h, w)
        for prompt, idx in rows.items():
            sel = torch.tensor(idx, device=g.device)
            by_prompt[prompt].add(layer, g[sel], delta[sel], h[sel], w[sel])

    steering.observer = observe
    try:
        for batch, examples in make_loader(ds, batches, recipe.data.prompt, 0):
            rows.clear()
            for i, p in enumerate(batch.prompts):
                rows.setdefault(p, []).append(i)
                by_prompt.setdefault(p, _Totals(layers, experts))
            for p, idx in rows.items():
                by_prompt[p].examples += len(idx)
            overall.examples += len(examples)
            real = model.encoder.audio_frames(batch.lengths)
            with autocast(model.device, precision):
                model.encode_audio(batch.waves.to(model.device), batch.lengths)
            if progress:
                progress(len(examples))
    finally:
        steering.observer = None
    scales = steering.scales.detach().float().cpu().tolist()
    cfg = recipe.model.steering
    return {
        "checkpoint": str(checkpoint), "data": str(data), "step": meta.get("step"),
        "placement": cfg.placement, "router": cfg.router, "top_k": cfg.top_k, "temperature": cfg.temperature,
        "num_layers": layers, "num_experts": experts, "examples": overall.examples,
        "frames": int(overall.frames[0]), "layers": overall.summary(scales),
        "by_prompt": {p: {"examples": t.examples, "layers": t.summary(scales)} for p, t in sorted(by_prompt.items())},
    }
