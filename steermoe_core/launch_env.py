"""What a launcher (torchrun, deepspeed, SLURM's srun) tells the processes it starts, read from the
environment without importing torch: a torch-free command (`infer --backend onnxruntime`) asks
whether it is one of several processes before anything heavy is loaded.
"""

from __future__ import annotations

import os


def launched_by_a_launcher() -> bool:
    """True inside a process that torchrun, deepspeed or srun started as part of a group."""
    return world_size() > 1 and "RANK" in os.environ


def world_size() -> int:
    """Processes in the launcher's group (1 when none started this one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node: the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))
