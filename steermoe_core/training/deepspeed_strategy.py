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
- checkpoints keep our format: ``adapter.safetensors`` (gathered under ZeRO-3) plus each rank's
  optimizer partition in ``CKPT/deepspeed/rank{r}.pt`` (trainable parameters only, never the GBs of
  frozen backbones), loaded with ``torch.load(weights_only=True)``.

On CPU (``train.device = "cpu"``) it runs over gloo with ``DS_ACCELERATOR=cpu`` and without
building DeepSpeed's C++ shared-memory extension.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from steermoe_core.atomic import atomic_file
from steermoe_core.errors import CheckpointError, UsageError
from steermoe_core.launch_env import launched_by_a_launcher
from steermoe_core.training.distributed import DEEPSPEED_MISSING, DDPStrategy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed(device: torch.device):
    """deepspeed, set up for ``device``: the CPU accelerator on CPU (set before the import, so its
    accelerator probe does not warn that it found no GPU), no C++ builds at start-up."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise UsageError(DEEPSPEED_MISSING) from None
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a ~2 min C++ build, CPU only
    if os.environ.get("STEERMOE_VERBOSE", "") not in ("", "0"):  # `steermoe --verbose`: DeepSpeed's own info lines too
        deepspeed.utils.logger.setLevel(logging.INFO)
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
        gradients make ZeRO's own overflow check skip the update and clear them. That check is
        DeepSpeed's, so a step it did take on a non-finite loss stops the run rather than going on
        with corrupted weights."""
        if skip and self.stage == 0:
            self.engine.zero_grad()
        self.engine.step()
        if skip and self.stage > 0 and not getattr(self.engine.optimizer, "overflow", False):
            raise RuntimeError("DeepSpeed stepped on a non-finite loss")
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if skip or norm is None else float(norm))

    def gathered(self, model: torch.nn.Module):
        """Every trainable parameter whole (adapter and LoRA alike): ZeRO-3 partitions them all."""
        if self.stage == 3:
            trainable = [p for p in model.parameters() if p.requires_grad]
            return self.deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
        return contextlib.nullcontext()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return None  # partitioned across ranks: saved by save_engine

    def save_engine(self, path) -> None:
        """Each rank's optimizer state (its ZeRO partition: Adam moments and fp32 master slices of the
        trainable parameters only) in ``deepspeed/rank{r}.pt``: plain tensors and a few DeepSpeed
        records, read back with ``torch.load(weights_only=True)``, never DeepSpeed's pickled engine
        checkpoint."""
        with atomic_file(Path(path) / "deepspeed" / f"rank{self.rank}.pt") as f:
            torch.save(self.engine.optimizer.state_dict(), f)

    def close(self) -> None:
        """Leave the group, and forget the groups DeepSpeed cached from it: a second run in the same
        process (ablate variants, tests) would otherwise broadcast over a destroyed group. The engine
        goes first: ZeRO-3's parameter hooks and prefetch state still reference the group, and a
        process that exits with them alive aborts ("terminate called without an active exception")."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        super().close()
        from deepspeed.utils import groups

        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
            if hasattr(groups, name):
                setattr(groups, name, None)

    def load_engine(self, path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
        if saved.get("optimizer") is not None:
            if self.stage > 0:  # ZeRO flattened the client optimizer already: its state cannot go there
                raise CheckpointError(
                    f"{path}: optimizer state written by the ddp engine; resume with distributed.engine = 'ddp' "
                    "(or distributed.zero_stage = 0)")
            optimizer.load_state_dict(saved["optimizer"])
            return
        folder = Path(path) / "deepspeed"
        saved_world = int(saved.get("world_size") or 1)
        if self.stage > 0 and saved_world != self.world_size:
            raise CheckpointError(
                f"{path}: ZeRO stage {self.stage} partitioned the optimizer state over {saved_world} processes; "
                f"resume with {saved_world} (or train with zero_stage = 0, whose state any world size can read)")
        ranks = range(saved_world) if self.stage > 0 else [0]
        missing = [r for r in ranks if not (folder / f"rank{r}.pt").is_file()]
        if missing:
            raise CheckpointError(f"{path}: no deepspeed/rank{missing[0]}.pt: not a complete deepspeed checkpoint of this steermoe version")
        states = [_load_optimizer_state(folder / f"rank{r}.pt") for r in ranks]
        if self.stage == 0:
            self.engine.optimizer.load_state_dict(states[0])
        else:  # ZeRO wants every rank's file (it picks its own, or merges them for an elastic layout)
            self.engine.optimizer.load_state_dict(states, load_optimizer_states=True,
                                                  load_from_fp32_weights=self.engine.zero_load_from_fp32_weights())


def _load_optimizer_state(path: Path) -> dict:
    """``torch.load(weights_only=True)`` with only the few DeepSpeed record types ZeRO's state holds allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable optimizer state ({type(e).__name__}: {e})") from None
