"""Optimizer and schedule: AdamW with one group per parameter family, warmup + cosine."""

from __future__ import annotations

import math

import torch

from steermoe_core.config import TrainConfig
from steermoe_core.model.steermoe import SteerMoEModel


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to ``min_lr_ratio`` at ``decay_steps`` (or ``max_steps``), then flat.

    The flat tail is what lets a finished run be made longer reproducibly: a recipe with more
    ``max_steps`` and the same ``decay_steps`` follows the shorter run's schedule step for step.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, (cfg.decay_steps or cfg.max_steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: SteerMoEModel, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """One AdamW group per parameter family, each with its own learning rate (0 = ``cfg.lr``)."""
    per_group = {
        "steering_vectors": cfg.lr_steering, "router": cfg.lr_router, "scales": cfg.lr_scales, "projector": cfg.lr_projector,
        "lora_encoder": cfg.lr_lora, "lora_llm": cfg.lr_lora,
    }
    groups = []
    for name, params in model.parameter_groups().items():
        lr = per_group[name] or cfg.lr
        if name == "projector" and cfg.weight_decay:
            groups.append({"name": "projector", "params": [model.projector.weight], "lr": lr, "weight_decay": cfg.weight_decay})
            groups.append({"name": "projector_bias", "params": [model.projector.bias], "lr": lr, "weight_decay": 0.0})
        else:
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), fused=device.type == "cuda")


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg))
