"""Joining the launcher's torch.distributed process group: what training's strategies and
inference's sharded folder job both need, kept below both so that neither imports the other.

NCCL between GPUs, gloo between CPU processes. A process no launcher started is a group of one:
nothing is initialized, and barriers return at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from steermoe_core.launch_env import launched_by_a_launcher, local_rank


def rank_device(device: torch.device) -> torch.device:
    """The device this process runs on: a GPU rank of a launched group takes the GPU its LOCAL_RANK
    names (and makes it current), so N processes on one node never share one GPU."""
    if launched_by_a_launcher() and device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def init_group(device: torch.device) -> tuple[int, int]:
    """Join the group (once per process) on the backend that suits ``device``; (rank, world size)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def leave_group() -> None:
    """Every rank done with its collectives first, then the group is destroyed: a group destroyed
    under another rank's pending work aborts that process at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Group:
    """This process's place in the group: enough for jobs that shard inputs, not gradients."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process merges, writes the final outputs and prints the summary."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[tuple[Group, torch.device]]:
    """Inside: (this process's ``Group``, its device); on the way out the group is left. A process no
    launcher started gets ``Group()`` (rank 0 of 1) and ``device`` as given."""
    device = rank_device(device)
    if not launched_by_a_launcher():
        yield Group(), device
        return
    rank, world = init_group(device)
    try:
        yield Group(rank, world), device
    finally:
        leave_group()
