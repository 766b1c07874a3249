"""How a training step is spread over processes: the seam for DDP and DeepSpeed.

The loop in ``training.loop`` never asks how many processes there are; it calls the strategy to
wrap the model, run forward/backward, step the optimizer, take its share of the batches and reduce
numbers for the log. ``SingleDevice`` is the one-process case. A multi-process strategy subclasses
``Strategy`` and overrides what differs (wrapping the adapter in DDP, ``deepspeed.initialize``,
``shard`` giving each rank a disjoint share, ``reduce_mean`` through the process group).
"""

from __future__ import annotations

import contextlib

import torch

from steermoe_core.data.batch import AudioBatch
from steermoe_core.errors import CheckpointError


class Strategy:
    name = "single"
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Only the main process logs, writes metrics and saves checkpoints."""
        return self.rank == 0

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap what needs wrapping before the first step."""

    def forward(self, model: torch.nn.Module, batch: AudioBatch) -> dict[str, torch.Tensor]:
        return model(batch)

    def backward(self, loss: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """``tokens``: target tokens behind this process's mean loss (lets several processes weight theirs)."""
        loss.backward()

    def accumulating(self, last: bool):
        """Context for one micro-batch; ``last`` = the one whose backward ends the optimizer step."""
        return contextlib.nullcontext()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, clip_grad: float, skip: bool = False) -> torch.Tensor:
        """Clip (0 = no clipping, norm still measured), step, zero; returns the pre-clip gradient norm.
        ``skip``: a non-finite loss somewhere: drop the gradients, leave weights and optimizer state as they are."""
        if skip:
            optimizer.zero_grad(set_to_none=True)
            return torch.tensor(float("nan"))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def shard(self, batches: list[list[int]]) -> list[list[int]]:
        """This process's share of an epoch's batches (all of them for one process)."""
        return batches

    def shard_items(self, items: list) -> list:
        """This process's share of examples to validate or evaluate (all of them for one process)."""
        return items

    def reduce_mean(self, value: float) -> float:
        return value

    def any_rank(self, flag: torch.Tensor) -> bool:
        """True when ``flag`` (a 0-dim bool tensor) is true on any process: one host sync per call."""
        return bool(flag)

    def reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order (on every process)."""
        return items

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in one)."""

    def gathered(self, model: torch.nn.Module):
        """Context in which the adapter's weights are whole on this process (ZeRO-3 partitions them)."""
        return contextlib.nullcontext()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """What train_state.pt keeps of the optimizer (None: the engine saves its own, see ``save_engine``)."""
        return optimizer.state_dict()

    def save_engine(self, path) -> None:
        """Engine state beside a checkpoint, written by every process (nothing for plain PyTorch)."""

    def load_engine(self, path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
        """Restore a resumed run's optimizer state (after ``prepare``): ``saved`` is its train_state.pt.
        Here the state lives in train_state.pt; None there means an engine kept its own (DeepSpeed),
        which this strategy cannot read, and dropping it would silently restart Adam's moments."""
        if saved.get("optimizer") is None:
            raise CheckpointError(f"{path}: optimizer state written by the deepspeed engine; resume with distributed.engine = 'deepspeed'")
        optimizer.load_state_dict(saved["optimizer"])

    def close(self) -> None:
        """Leave the process group, if any."""


class SingleDevice(Strategy):
    """One process on one device: the default, and what `--gpus 1` runs."""
