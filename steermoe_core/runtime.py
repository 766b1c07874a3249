"""Where and how tensors run: device choice and the precision policy shared by train, eval, infer
and the benchmarks.

``precision = "auto"`` decides per phase, by what measures faster there:

- training (``phase="train"``): bf16 autocast only where the hardware runs bf16 natively (a CUDA
  GPU with bf16, or a CPU with AVX512-BF16 / AMX), fp32 everywhere else. On an AVX2-only x86 CPU
  bf16 matmuls are emulated and run about 4x *slower* than fp32; on an AVX512-BF16 one a training
  step's large matmuls run about 4x faster.
- decoding (``phase="decode"``: eval, infer, serve, the demo's scoring): bf16 on a GPU with bf16,
  fp32 on every CPU. A decode step is a handful of (batch x 576) by (576 x N) products, too small for
  AMX tiles to pay for bf16's conversions and oneDNN's per-shape kernel builds: the shipped model
  decoded 2.6-3.4x slower in bf16 than fp32 on an AMX CPU (``benchmarks/infer_cpu.py``).

One decision per phase, made here, keeps `eval` and `infer` giving the same text for a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from steermoe_core.errors import DeviceError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PHASES = ("train", "decode")
_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX512-BF16, AMX) and aarch64 (BF16)


def pick_device(name: str) -> torch.device:
    """``auto`` = the first CUDA GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but no CUDA GPU is visible")
    return dev


def prefer_shape_free_attention(device: torch.device) -> None:
    """On CUDA, switch off the cuDNN backend of ``scaled_dot_product_attention`` (flash and
    memory-efficient attention stay on).

    torch picks cuDNN attention on Hopper GPUs, and cuDNN builds an execution plan for every new
    sequence length: about 6 ms of CPU per attention call on an H200 (torch 2.11). Speech batches
    are length-bucketed, so nearly every training step and every decoded token has a new length.
    Measured with ``benchmarks/train_step.py`` (see benchmarks/RESULTS.md). The switch is global to
    the process, as torch's backend flags are.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """dtype of the frozen backbones' weights: ``auto`` = bf16 on a GPU, fp32 on a CPU.

    On a CPU, fp32 weights under bf16 autocast cost nothing extra and stay exact for fp32 runs.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_amx() -> bool:
    """True where oneDNN runs bf16 matmuls on AMX tiles (Intel Sapphire Rapids and later): about 4x fp32,
    against about 2x on AVX512-BF16 alone (a 512x576x1536 linear on a 2-core AMD EPYC: fp32 5.2 ms, bf16
    2.4 ms). Callers that size work to a time budget need the difference."""
    flags = _cpu_flags()
    return cpu_has_native_bf16() and flags is not None and "amx_bf16" in flags


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True only when oneDNN will run bf16 matmuls on real bf16 instructions.

    oneDNN's own check turns False when it is limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``); it
    says True on plain AVX512 too, where bf16 is emulated, so the CPU's flags must also list a bf16
    instruction set.
    """
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    flags = _cpu_flags()
    return onednn and flags is not None and bool(flags & _BF16_CPU_FLAGS)


def cuda_has_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Precision:
    """The autocast precision actually used, and why (printed by train, eval, infer, demo, benchmarks)."""

    name: str  # bf16 | fp16 | fp32
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def resolve_precision(requested: str, device: torch.device, phase: str = "train") -> Precision:
    """Turn a recipe's ``precision`` into the one this device will run for ``phase``.

    ``phase`` is ``train`` (forward + backward over whole sequences: training, validation loss) or
    ``decode`` (token-by-token generation: eval, infer, serve, the demo's scores). Only ``auto``
    depends on it; a precision set in the recipe is used for both.
    """
    if requested not in PRECISIONS:
        raise DeviceError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
    if device.type == "cuda":
        native = cuda_has_bf16(device)
        if requested == "auto":
            return Precision("bf16", "auto: GPU with bf16") if native else Precision("fp32", "auto: GPU without bf16")
        if requested == "bf16" and not native:
            raise DeviceError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use auto, fp16 or fp32")
        return Precision(requested, "set in the recipe")
    native = cpu_has_native_bf16()
    if requested == "auto":
        if phase == "decode":
            why = ("auto: decoding on a CPU, where token-by-token steps run faster in fp32 than bf16 even with "
                   "native bf16 (AMX)") if native else "auto: CPU without native bf16, where bf16 is ~4x slower than fp32"
            return Precision("fp32", why)
        if native:
            return Precision("bf16", "auto: training on a CPU with native bf16 (AVX512-BF16/AMX)")
        return Precision("fp32", "auto: CPU without native bf16, where bf16 is ~4x slower than fp32")
    if requested in ("bf16", "fp16") and not native:
        return Precision(requested, "set in the recipe; this CPU emulates it, expect it ~4x slower than fp32")
    return Precision(requested, "set in the recipe")


def autocast(device: torch.device, precision: Precision | str):
    """bf16/fp16 autocast on ``device``; fp32 means no autocast."""
    name = precision.name if isinstance(precision, Precision) else precision
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without stalling the host on the GPU's queue.

    A copy from pageable memory waits for the stream to drain: a hidden sync in every step.
    """
    if device.type != "cuda":
        return t
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
