"""`[distributed] engine = "deepspeed"`: the DeepSpeed strategy (ZeRO stage 0-3 from the recipe).

Same seam as DDP (``DDPStrategy``, whose sharding, reductions and token weighting it inherits);
what differs is that ``deepspeed.initialize`` owns the optimizer step:

- the optimizer is ours (``training.optim.make_optimizer``: AdamW with one group per parameter
  family), handed to DeepSpeed as a client optimizer, so per-group learning rates apply exactly as
  in a DDP run and DeepSpeed never compiles its FusedAdam; the LambdaLR schedule stays the loop's;
- gradient accumulation and clipping are DeepSpeed's (``gradient_accumulation_steps``,
  ``gradient_clipping``; the accumulation boundary is set explicitly on the last micro-batch);
- precision follows the runtime policy: fp32 weights and bf16/fp16 autocast (DeepSpeed's
  ``torch_autocast``), so the adapter keeps fp32 master weights as in every other run;
- checkpoints keep our format: ``adapter.safetensors`` (gathered under ZeRO-3) plus DeepSpeed's
  own optimizer partitions in ``CKPT/deepspeed/`` written with ``exclude_frozen_parameters=True``
  (never the GBs of frozen backbones).

On CPU (``train.device = "cpu"``) it runs over gloo with ``DS_ACCELERATOR=cpu`` and without
building DeepSpeed's C++ shared-memory extension.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from steermoe_core.errors import CheckpointError, UsageError
from steermoe_core.training.distributed import (
    DEEPSPEED_MISSING,
    DDPStrategy,
    launched_by_a_launcher,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed(device: torch.device):
    """deepspeed, set up for ``device``: the CPU accelerator on CPU, no C++ builds at start-up."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise UsageError(DEEPSPEED_MISSING) from None
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a ~2 min C++ build, CPU only
    return deepspeed


def deepspeed_config(recipe, world_size: int, precision_name: str) -> dict:
    """The DeepSpeed config equivalent to the recipe's training section."""
    cfg = {
        "train_micro_batch_size_per_gpu": max(1, recipe.data.batch_size // world_size),
        "gradient_accumulation_steps": recipe.train.grad_accum,
        "gradient_clipping": recipe.train.clip_grad,
        "zero_optimization": {"stage": recipe.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,  # our AdamW with per-family groups
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if precision_name in ("bf16", "fp16"):
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision_name == "bf16" else "float16"}
    return cfg


class DeepSpeedStrategy(DDPStrategy):
    name = "deepspeed"

    def __init__(self, device: torch.device, recipe, precision=None):
        self.deepspeed = import_deepspeed(device)
        if not launched_by_a_launcher():  # one process: DeepSpeed still wants a process group
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(k, v)
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not dist.is_initialized():
            self.deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.recipe = recipe
        self.stage = recipe.distributed.zero_stage
        self.precision_name = precision.name if precision is not None else "fp32"
        self.engine = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        self.engine, *_ = self.deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=trainable,
            config=deepspeed_config(self.recipe, self.world_size, self.precision_name),
        )

    def forward(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        return self.engine(batch)

    def backward(self, loss: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """The loop already divided by the micro-batches per step: DeepSpeed must not divide again."""
        self.engine.backward(self.token_weighted(loss, tokens), scale_wrt_gas=False)

    def accumulating(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, clip_grad: float, skip: bool = False) -> torch.Tensor:
        """DeepSpeed clips and steps. A skipped step: at stage 0 the gradients are dropped before the
        step (AdamW leaves parameters without gradients untouched); at stages 1-3 the non-finite
        gradients make ZeRO's own overflow check skip the update and clear them."""
        if skip and self.stage == 0:
            self.engine.zero_grad()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if skip or norm is None else float(norm))

    def gathered(self, model: torch.nn.Module):
        if self.stage == 3:
            return self.deepspeed.zero.GatheredParameters(list(model.adapter.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return None  # partitioned across ranks: saved by save_engine

    def save_engine(self, path) -> None:
        self.engine.save_checkpoint(str(Path(path) / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_engine(self, path, saved_world_size: int | None = None) -> None:
        folder = Path(path) / "deepspeed"
        if not folder.is_dir():
            raise CheckpointError(f"{path}: not written by the deepspeed engine (no deepspeed/): resume with the engine it was trained with")
        if self.stage > 0 and saved_world_size not in (None, self.world_size):
            raise CheckpointError(
                f"{path}: ZeRO stage {self.stage} partitioned the optimizer state over {saved_world_size} processes; "
                f"resume with {saved_world_size} (or train with zero_stage = 0, whose state any world size can read)")
        self.engine.load_checkpoint(str(folder), tag="state", load_module_strict=False, load_lr_scheduler_states=False)
