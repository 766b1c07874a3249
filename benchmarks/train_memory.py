"""Host memory of a long CPU training run: a new batch shape every step against padded, repeated shapes.

    python benchmarks/train_memory.py                       # Whisper tiny + SmolLM2-135M shapes, 150 steps
    python benchmarks/train_memory.py --steps 300 --ctc-only
    python benchmarks/train_memory.py --smoke               # tiny shapes, a few steps (what CI runs)

oneDNN builds and caches kernels per tensor shape. Clips of every length give every batch a new width,
so the cache never hits and the process grows step after step (the demo's 3,000-step run was killed
for memory at step 2,990). ``data.pad_multiple_seconds`` (training's default 1 s) pads each batch so
shapes repeat. Each arm runs in its own process (the cache is per process) through the product's own
``train_step``, with random weights and random clips of 2-6 s, and prints its resident memory
(RSS) every ``--every`` steps, its growth per step over the second half, and its speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import build, make_batch  # noqa: E402

from steermoe_core.config import TrainConfig  # noqa: E402
from steermoe_core.runtime import resolve_precision  # noqa: E402
from steermoe_core.training.loop import train_step  # noqa: E402
from steermoe_core.training.optim import make_optimizer  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def run_arm(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build(args.whisper, args.llm, device, trim=True, experts=8)
    model.ctc_weight, model.ctc_only = 1.0, args.ctc_only
    model.pad_to_repeated_shapes(args.pad_seconds)
    precision = resolve_precision(args.precision, device)
    opt = make_optimizer(model, TrainConfig(lr=1e-3), device)
    rng = np.random.default_rng(0)
    model.train()
    points, t0 = [], None
    for step in range(1, args.steps + 1):
        batch = make_batch(list(rng.uniform(2.0, 6.0, args.batch)), device, tps=2.5)
        train_step(model, opt, [batch], precision, clip_grad=1.0)
        if step == args.every:
            t0 = time.perf_counter()  # speed from here: the first steps build every kernel
        if step % args.every == 0:
            points.append((step, round(rss_mb())))
            print(f"  pad {args.pad_seconds:g} s  step {step:4d}  RSS {points[-1][1]:6d} MB", flush=True)
    half = [p for p in points if p[0] >= args.steps // 2]
    slope = (half[-1][1] - half[0][1]) / max(1, half[-1][0] - half[0][0])
    steps_timed = args.steps - args.every
    return {"pad_seconds": args.pad_seconds, "precision": str(precision), "rss_mb": points,
            "growth_mb_per_step_second_half": round(slope, 2),
            "s_per_step": round((time.perf_counter() - t0) / max(1, steps_timed), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisper", default="tiny")
    ap.add_argument("--llm", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=10, help="steps between RSS readings")
    ap.add_argument("--ctc-only", action="store_true", help="the CTC-only stage: encoder, steering and CTC, no LLM pass")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--pad", type=float, default=1.0, help="the padded arm's data.pad_multiple_seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 6 steps")
    ap.add_argument("--pad-seconds", type=float, default=None, help=argparse.SUPPRESS)  # one arm, in a child process
    args = ap.parse_args()
    if args.smoke:
        args.llm, args.batch, args.steps, args.every = "smoke", 2, 6, 2
    if args.pad_seconds is not None:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; whisper {args.whisper}, llm {args.llm}, "
          f"batch {args.batch} of 2-6 s, {args.steps} steps{' (CTC only)' if args.ctc_only else ''}")
    results = []
    for pad in (0.0, args.pad):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--pad-seconds", str(pad)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        print("".join(line + "\n" for line in out.splitlines() if line.strip() and not line.startswith("RESULT ")), end="")
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    print(f"precision {results[0]['precision']}")
    for r in results:
        label = "new shape every step" if r["pad_seconds"] == 0 else f"padded to {r['pad_seconds']:g} s / 8 tokens"
        print(f"{label:>30}: RSS {r['rss_mb'][0][1]} -> {r['rss_mb'][-1][1]} MB, "
              f"growth_mb_per_step (second half) {r['growth_mb_per_step_second_half']}, s_per_step {r['s_per_step']}")


if __name__ == "__main__":
    main()
