"""Inference speed at any shape, random weights: single-stream decode tokens/s and batched
transcription real-time factor.

    python benchmarks/infer.py --whisper large-v3 --llm qwen2.5-7b [--static-cache]
    python benchmarks/infer.py --smoke                 # tiny shapes on CPU (what CI runs)

Decoding is forced to a fixed length (min_new_tokens = max_new_tokens): random weights would
otherwise stop at a random end-of-turn token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import TOKENS_PER_SECOND, build, librispeech_durations, make_batch  # noqa: E402

from steermoe_core.data.batch import AudioBatch  # noqa: E402
from steermoe_core.runtime import autocast, resolve_precision  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, batch: AudioBatch, n_tokens: int, device, precision, options) -> float:
    batch.waves = batch.waves.to(device)
    sync(device)
    t = time.perf_counter()
    with autocast(device, precision):
        ids = model.generate_ids(batch, max_new_tokens=n_tokens, min_new_tokens=n_tokens, **options)
    sync(device)
    assert ids.shape[1] == n_tokens, ids.shape
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisper", default="large-v3")
    ap.add_argument("--llm", default="qwen2.5-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=256, help="single stream: tokens to decode")
    ap.add_argument("--clip-seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=64, help="batched transcription: clips per batch")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--static-cache", action="store_true", help="static KV cache (transformers compiles the decode step)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--cudnn-attention", action="store_true", help="keep torch's cuDNN attention on (the product turns it off on CUDA)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.whisper, args.llm, args.device, args.tokens, args.batch, args.batches = "tiny", "smoke", "cpu", 16, 4, 1
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device, "decode")
    print(f"precision: {precision}")
    model = build(args.whisper, args.llm, device, trim=True, cudnn_attention=args.cudnn_attention).eval()
    options = {"cache_implementation": "static"} if args.static_cache else {}

    one = make_batch([args.clip_seconds], device, None, 1)
    one.targets = None
    for _ in range(2):  # warm-up (and compilation, with a static cache)
        timed_generate(model, one, args.tokens, device, precision, options)
    prefill = min(timed_generate(model, one, 1, device, precision, options) for _ in range(3))
    total = min(timed_generate(model, one, args.tokens, device, precision, options) for _ in range(3))
    decode_tps = (args.tokens - 1) / (total - prefill)

    durs = librispeech_durations(args.batch * args.batches, seed=1)
    batches = [sorted(durs[i * args.batch : (i + 1) * args.batch]) for i in range(args.batches)]
    timed_generate(model, AudioBatch(**{**make_batch(batches[0], device, None, 1).__dict__, "targets": None}), 8, device, precision, options)
    wall = audio = 0.0
    for durs_b in batches:
        b = make_batch(durs_b, device, None, 1)
        b.targets = None
        n = math.ceil(TOKENS_PER_SECOND * float(np.mean(durs_b)))  # decode the batch's mean transcript length
        wall += timed_generate(model, b, n, device, precision, options)
        audio += float(sum(durs_b))
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "whisper": args.whisper, "llm": args.llm, "static_cache": args.static_cache, "cudnn_attention": args.cudnn_attention, "precision": precision.name,
        "single_stream_prefill_s": prefill, "single_stream_decode_tokens_per_s": decode_tps,
        "single_stream_end_to_end_tokens_per_s": args.tokens / total,
        "batched_clips": args.batch * args.batches, "batch": args.batch, "batched_real_time_factor": audio / wall,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
