"""Multi-process training: launching through ``torch.distributed.run`` and the DDP strategy.

`steermoe train RECIPE --gpus N` re-runs the same command under ``torch.distributed.run`` with N
processes per node (the CLI does that, as torchtune's `tune run --nproc_per_node` does). A process
started by any launcher (torchrun, deepspeed, SLURM's srun) finds RANK / WORLD_SIZE / MASTER_ADDR in its
environment and joins the group instead of launching again.

``data.batch_size`` is the global batch whatever N: every process walks the same length-bucketed
global batches and takes its own slice of each, so the data position (in global batches) means the
same thing for any N and `--resume` works across world sizes.
"""

from __future__ import annotations

import contextlib
import gc

import torch
import torch.distributed as dist

from steermoe_core.process_group import init_group, leave_group
from steermoe_core.training.strategy import Strategy


def some_weights_sit_out(recipe) -> bool:
    """True when some trainable weights get no gradient in some steps: the CTC-only steps of a
    curriculum (``train.ctc_only_steps``) skip the LLM, so its LoRA matrices sit them out, and a
    text-only reader micro-batch (``train.reader_batch``) leaves the adapter out."""
    return recipe is not None and recipe.model.llm.lora is not None and (recipe.train.ctc_only_steps > 0 or recipe.train.reader_batch > 0)


class DDPStrategy(Strategy):
    """DistributedDataParallel over the adapter only: the frozen backbones are plain replicas on
    every process and get no gradient buckets. NCCL on GPUs, gloo on CPUs."""

    name = "ddp"

    def __init__(self, device: torch.device, find_unused_parameters: bool = False):
        """``find_unused_parameters``: some trainable weights get no gradient in some steps (see
        ``some_weights_sit_out``); DDP then has to look for them instead of waiting forever."""
        self.find_unused_parameters = find_unused_parameters
        self.rank, self.world_size = init_group(device)
        self.device = device
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        self.ddp = DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=self.find_unused_parameters)

    def forward(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        return self.ddp(batch)

    def token_weighted(self, loss: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Weight each process's mean by its share of the target tokens, so the engine's average of
        the gradients equals the gradient of the mean over all tokens (what one process computes)."""
        if tokens is None:
            return loss
        counts = tokens.detach().to(self.device, torch.float32).reshape(1)
        total = counts.clone()
        dist.all_reduce(total)
        return loss * (counts * self.world_size / total).squeeze(0)

    def backward(self, loss: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        self.token_weighted(loss, tokens).backward()

    def accumulating(self, last: bool):
        """Gradients are all-reduced once per optimizer step, on its last micro-batch."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def shard(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's slice of every global batch (a batch smaller than the world lends its items round-robin)."""
        return [b[self.rank :: self.world_size] or [b[self.rank % len(b)]] for b in batches]

    def shard_items(self, items: list) -> list:
        return items[self.rank :: self.world_size]

    def reduce_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def any_rank(self, flag: torch.Tensor) -> bool:
        t = flag.detach().to(self.device, torch.float32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, items: list) -> list:
        out: list[list] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        # DDP's reducer holds the work objects of its last all-reduce; freed only at interpreter
        # exit, after the group is gone, they aborted a gloo rank now and then ("terminate called
        # without an active exception", exit -6). Free them while everything is still alive.
        self.ddp = None
        gc.collect()
        leave_group()


DEEPSPEED_MISSING = "distributed.engine = 'deepspeed' needs DeepSpeed: pip install 'steermoe[deepspeed]'"
