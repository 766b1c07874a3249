"""Which strategy a training (or eval) process runs: one device, DDP or DeepSpeed."""

from __future__ import annotations

import torch

from steermoe_core.errors import UsageError
from steermoe_core.launch_env import launched_by_a_launcher
from steermoe_core.process_group import rank_device
from steermoe_core.training.distributed import DEEPSPEED_MISSING, DDPStrategy, some_weights_sit_out
from steermoe_core.training.strategy import SingleDevice, Strategy


def check_engine_available(engine: str) -> None:
    """One line saying how to install the engine the recipe asks for, before anything is launched."""
    import importlib.util

    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(DEEPSPEED_MISSING)


def make_strategy(engine: str, device: torch.device, recipe=None, precision=None) -> tuple[Strategy, torch.device]:
    """The strategy for this process (single device, DDP when started as part of a group, or
    DeepSpeed whenever the recipe asks for it) and its device (a GPU rank takes the GPU its
    LOCAL_RANK names). ``recipe`` and ``precision`` configure DeepSpeed."""
    check_engine_available(engine)
    device = rank_device(device)
    if engine == "deepspeed":
        from steermoe_core.training.deepspeed_strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(device, recipe, precision), device
    if launched_by_a_launcher():
        return DDPStrategy(device, some_weights_sit_out(recipe)), device
    return SingleDevice(), device
