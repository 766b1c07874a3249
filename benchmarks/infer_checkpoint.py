"""Batched transcription speed of a real checkpoint on a prepared dataset (e.g. the demo's).

    python benchmarks/infer_checkpoint.py ~/.cache/steermoe/demo/steermoe/model ~/.cache/steermoe/demo/data/valid

Prints real-time factor (audio seconds per wall second) per batch size, and WER, through the same
`SteerMoE.transcribe` API that `steermoe infer` uses.
"""

from __future__ import annotations

import argparse
import time

import torch

from steermoe_core.data.dataset import ShardedDataset
from steermoe_core.evaluation.metrics import word_error_rate
from steermoe_core.inference import SteerMoE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("data", help="prepared dataset folder")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--limit", type=int, default=100, help="utterances (0 = all)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    sm = SteerMoE.load(args.checkpoint, args.device)
    ds = ShardedDataset(args.data)
    n = len(ds) if not args.limit else min(args.limit, len(ds))
    exs = [ds[i] for i in range(n)]
    audio_s = sum(len(e.audio) for e in exs) / 16000
    print(f"device {sm.device}, threads {torch.get_num_threads()}, {n} utterances, {audio_s:.0f} s of audio")
    sm.transcribe([exs[0].audio], max_new_tokens=48)  # warm-up
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        t = time.perf_counter()
        res = sm.transcribe([e.audio for e in exs], batch_size=bs, max_new_tokens=48)
        wall = time.perf_counter() - t
        wer = word_error_rate([e.text for e in exs], [r.text for r in res])
        print(f"batch {bs:3d}: {wall:6.1f} s wall, {audio_s / wall:6.1f}x real time, WER {100 * wer:.1f}%")


if __name__ == "__main__":
    main()
