"""Training-step time with torch's cuDNN attention on and off, on repeated and on new batch shapes (CUDA only).

    python benchmarks/attention_backends.py                      # Whisper tiny + SmolLM2-135M (the demo's shapes)
    python benchmarks/attention_backends.py --whisper large-v3 --llm qwen2.5-7b --batch-seconds 240

Why it exists: cuDNN builds an execution plan per new sequence length, and length-bucketed speech
batches bring a new length nearly every step; the product turns cuDNN attention off on CUDA
(``runtime.prefer_shape_free_attention``). Each cell is the product's own ``train_step``; the
rounds alternate on/off twice, so a drift of the machine shows up as a difference between rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import build, librispeech_batches  # noqa: E402

from steermoe_core.config import TrainConfig  # noqa: E402
from steermoe_core.runtime import resolve_precision  # noqa: E402
from steermoe_core.training.loop import train_step  # noqa: E402
from steermoe_core.training.optim import make_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisper", default="tiny")
    ap.add_argument("--llm", default="smollm2-135m")
    ap.add_argument("--batch-seconds", type=float, default=72.0, help="padded seconds per batch")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--utterances", type=int, default=800, help="LibriSpeech-shaped clips drawn (enough for 5 + 4 x steps batches)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_backends.py: needs a CUDA GPU (cuDNN attention exists only there)")
    dev = torch.device("cuda")
    prec = resolve_precision("auto", dev)
    model = build(args.whisper, args.llm, dev, trim=True, cudnn_attention=True)
    model.max_target_tokens = 448
    model.train()
    opt = make_optimizer(model, TrainConfig(lr=1e-4), dev)
    work = librispeech_batches(args.utterances, args.batch_seconds, args.max_batch, dev)
    batches = work.batches
    if len(batches) < 5 + 4 * args.steps:
        sys.exit(f"only {len(batches)} batches: raise --utterances or lower --steps")
    for b in batches[:5]:
        train_step(model, opt, [b], prec, clip_grad=1.0)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, {args.whisper} + {args.llm}, {prec}")
    nxt = 5
    for cudnn in (True, False, True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for label, bs in (("repeated shape", [batches[0]] * args.steps), ("new shapes", batches[nxt : nxt + args.steps])):
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            for b in bs:
                train_step(model, opt, [b], prec, clip_grad=1.0)
            torch.cuda.synchronize(dev)
            ms = (time.perf_counter() - t) / len(bs) * 1000
            print(f"cuDNN attention {'on ' if cudnn else 'off'}  {label:<15} {ms:8.1f} ms/step", flush=True)
        nxt += args.steps


if __name__ == "__main__":
    main()
