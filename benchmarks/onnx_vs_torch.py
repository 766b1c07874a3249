"""onnxruntime vs torch on one checkpoint, side by side in one run: export time, file sizes,
real-time factor, WER and how many transcripts are identical.

    python benchmarks/onnx_vs_torch.py CKPT DATA [--limit 48] [--batch-sizes 1,8] [--quantize]
    python benchmarks/onnx_vs_torch.py --smoke      # tiny random backbones, a few seconds

CKPT is a checkpoint folder; DATA a prepared dataset (e.g. the demo's held-out split). The torch
backend runs in float32 (the export's precision) so the two compute the same thing; ``--quantize``
adds an int8 export. Decoding goes through ``SteerMoE.transcribe``, the API behind `steermoe infer`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from steermoe_core.evaluation.metrics import word_error_rate
from steermoe_core.export.onnx_export import export_onnx
from steermoe_core.inference import SteerMoE
from steermoe_core.inference.onnx_backend import OnnxBackend
from steermoe_core.generation.torch_backend import TorchBackend
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.runtime import resolve_precision


def smoke_inputs(root: Path) -> tuple[Path, list, list[str]]:
    """A random-adapter checkpoint on tiny random backbones and a few tone clips (no reference texts)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from conftest import tiny_recipe_dict, tone_clip

    from steermoe_core.config import recipe_from_dict
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint
    from steermoe_core.testing.random_backbones import write_llm, write_whisper

    bb = {"whisper": write_whisper(root / "whisper"), "llm": write_llm(root / "llm", init_std=0.2)}
    recipe = recipe_from_dict(tiny_recipe_dict(bb))
    ckpt = save_checkpoint(build_model(recipe.model, torch.device("cpu")), recipe, root / "ckpt", 0, {})
    return ckpt, [tone_clip(i % 4, 1.0 + 0.5 * i) for i in range(8)], [""] * 8


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as work:  # exports of a real model take a GB
        run(Path(work))


def run(work: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("data", nargs="?", help="prepared dataset folder")
    ap.add_argument("--limit", type=int, default=48, help="utterances (0 = all)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--quantize", action="store_true", help="also export and time an int8 model")
    ap.add_argument("--smoke", action="store_true", help="tiny random backbones instead of CKPT/DATA")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per backend (best is reported)")
    ap.add_argument("--threads", type=int, default=0, help="threads for both runtimes (0 = their defaults)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["STEERMOE_ORT_THREADS"] = str(args.threads)
    if args.smoke:
        ckpt, audio, refs = smoke_inputs(work)
        args.max_new_tokens = 12
    else:
        from steermoe_core.data.dataset import ShardedDataset

        ckpt, ds = Path(args.checkpoint), ShardedDataset(args.data)
        n = len(ds) if not args.limit else min(args.limit, len(ds))
        exs = [ds[i] for i in range(n)]
        audio, refs = [e.audio for e in exs], [e.text for e in exs]
    audio_s = sum(len(a) for a in audio) / 16000
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(audio)} clips, {audio_s:.0f} s of audio")

    backends = {}
    for label, quantize in [("onnxruntime fp32", None)] + ([("onnxruntime int8", "int8")] if args.quantize else []):
        out = work / label.replace(" ", "-")
        t = time.perf_counter()
        manifest = export_onnx(ckpt, out, quantize=quantize)
        wall = time.perf_counter() - t
        sizes = {p.name: p.stat().st_size / 1e6 for p in sorted(out.rglob("*")) if p.is_file() and p.stat().st_size > 1e6}
        secs = manifest["export_seconds"]
        print(f"export {label}: {wall:.1f} s (audio tower {secs['audio_tower']:.1f} s, decoder {secs['decoder']:.1f} s); "
              + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))
        backends[label] = OnnxBackend.load(out, "cpu")
    model, recipe, _ = load_checkpoint(ckpt, torch.device("cpu"))
    backends = {"torch fp32": TorchBackend(model, resolve_precision("fp32", torch.device("cpu"))), **backends}

    texts = {}
    for label, backend in backends.items():
        SteerMoE(backend).transcribe([audio[0]], max_new_tokens=args.max_new_tokens)  # warm-up
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        walls: dict[str, list[float]] = {label: [] for label in backends}
        for _ in range(args.repeats):  # backends take turns, so a busy machine slows them alike
            for label, backend in backends.items():
                t = time.perf_counter()
                res = SteerMoE(backend).transcribe(audio, batch_size=bs, max_new_tokens=args.max_new_tokens)
                walls[label].append(time.perf_counter() - t)
                texts[label] = [r.text for r in res]
        for label in backends:
            wall = min(walls[label])
            same = sum(a == b for a, b in zip(texts[label], texts["torch fp32"]))
            wer = f", WER {100 * word_error_rate(refs, texts[label]):.1f}%" if any(refs) else ""
            print(f"batch {bs:3d} {label:17s}: {wall:6.1f} s wall (best of {args.repeats}), real_time_factor "
                  f"{audio_s / wall:6.1f}x{wer}, identical to torch {same}/{len(audio)}")


if __name__ == "__main__":
    main()
