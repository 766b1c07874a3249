"""CPU decoding in one run: the shipped model on torch and on onnxruntime, and Whisper tiny.en's own
decoder, on the same held-out clips at the same batch sizes; real-time factors and WER.

    python benchmarks/infer_cpu.py                       # the shipped model, 16 held-out clips + 3 real ones
    python benchmarks/infer_cpu.py --onnx-dir DIR        # reuse (or build once into) an export (default: infer's cached one)
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/infer_cpu.py   # an AVX2-only CPU
    python benchmarks/infer_cpu.py --smoke               # tiny random backbones, seconds (what CI runs)

Clips: the demo's out-of-domain set (Harvard sentences spoken by voices no training heard, flite and
espeak-ng, at the demo's speeds) plus pytest-audioeval's three English recordings. Decoding goes
through ``SteerMoE.transcribe`` (what `steermoe infer` runs) at the decoding precision ``auto``
resolves to; Whisper's decoder through ``evaluation.whisper_decoder`` (greedy, 30 s padded features,
as Whisper runs). Systems take turns within each repeat, so a busy machine slows them alike; the best
repeat is reported. The real-time factor is audio seconds over wall seconds (higher is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import steermoe_core  # noqa: F401, I001  (before torch: it sets OpenMP's wait policy, read when torch loads)

import numpy as np
import torch

from steermoe_core.evaluation.metrics import word_error_rate
from steermoe_core.inference import SteerMoE
from steermoe_core.generation.torch_backend import TorchBackend
from steermoe_core.model.checkpoint import load_checkpoint
from steermoe_core.runtime import resolve_precision


def held_out_clips(n: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` out-of-domain demo sentences in the held-out voices, then the real English clips."""
    from steermoe_core.backbones.weights import resolve_path
    from steermoe_core.audio import load_audio
    from steermoe_core.data.prep.synth import DEFAULT_SPEEDS, parse_voice, synthesize
    from steermoe_core.demo.run import REAL_CLIPS
    from steermoe_core.demo.text import HELDOUT_VOICES, out_of_domain_sentences

    audio, refs = [], []
    for i, text in enumerate(out_of_domain_sentences(n)):
        engine, voice = parse_voice(HELDOUT_VOICES[i % len(HELDOUT_VOICES)])
        audio.append(synthesize(text, engine, voice, DEFAULT_SPEEDS[(i * 7) % len(DEFAULT_SPEEDS)]))
        refs.append(text)
    for wav in sorted(Path(resolve_path(REAL_CLIPS)).glob("*.wav")):
        audio.append(load_audio(wav))
        refs.append(wav.with_suffix(".txt").read_text().strip())
    return audio, refs


def smoke_inputs(root: Path) -> tuple[Path, str, list[np.ndarray], list[str]]:
    """A random-adapter checkpoint on tiny random backbones (with a Whisper tokenizer for its decoder)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from conftest import tiny_recipe_dict, tone_clip
    from tokenizers import Tokenizer, models

    from steermoe_core.config import recipe_from_dict
    from steermoe_core.model.build import build_model
    from steermoe_core.model.checkpoint import save_checkpoint
    from steermoe_core.testing.random_backbones import write_llm, write_whisper

    whisper = write_whisper(root / "whisper")
    vocab = {f"w{i}": i for i in range(300)}
    for name, i in (("<|endoftext|>", 2), ("<|startoftranscript|>", 3), ("<|notimestamps|>", 4)):
        vocab.pop(f"w{i}")
        vocab[name] = i
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(whisper / "tokenizer.json"))
    bb = {"whisper": whisper, "llm": write_llm(root / "llm", init_std=0.2)}
    recipe = recipe_from_dict(tiny_recipe_dict(bb))
    ckpt = save_checkpoint(build_model(recipe.model, torch.device("cpu")), recipe, root / "ckpt", 0, {})
    return ckpt, str(whisper), [tone_clip(i % 4, 1.0 + 0.5 * i) for i in range(8)], [""] * 8


def onnx_backend(ckpt: Path, folder: Path | None, work: Path, smoke: bool = False):
    """The export in ``folder`` (built there first when it has none), else the one `steermoe infer`
    uses by default on a CPU (``export.cache``: built once, cached; the smoke run's is thrown away)."""
    from steermoe_core.export.cache import cached_export
    from steermoe_core.export.onnx_export import export_onnx
    from steermoe_core.inference.onnx_backend import OnnxBackend

    if folder is None and not smoke:
        t = time.perf_counter()
        out = cached_export(ckpt, say=lambda line: print(line, flush=True))
        print(f"the cached export: {out} ({time.perf_counter() - t:.1f} s to find or build)", flush=True)
        return OnnxBackend.load(out, "cpu")
    out = folder or work / "onnx"
    if not (out / "manifest.json").exists():
        t = time.perf_counter()
        manifest = export_onnx(ckpt, out)
        secs = manifest["export_seconds"]
        print(f"export: {time.perf_counter() - t:.1f} s (audio tower {secs['audio_tower']:.1f} s, decoder {secs['decoder']:.1f} s), "
              f"parity {manifest['parity']}", flush=True)
    return OnnxBackend.load(out, "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the shipped model)")
    ap.add_argument("--clips", type=int, default=16, help="synthesised held-out sentences (the real clips come on top)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per system (the best is reported)")
    ap.add_argument("--threads", type=int, default=0, help="threads for every system (0 = torch's default)")
    ap.add_argument("--onnx-dir", type=Path, help="an export to reuse, or where to build it once")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime backend")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--smoke", action="store_true", help="tiny random backbones (no real weights, no WER)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["STEERMOE_ORT_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="infer-cpu-") as work:
        run(args, Path(work))


def run(args, work: Path) -> None:
    from steermoe_core.evaluation.whisper_decoder import WhisperDecoderBaseline
    from steermoe_core.inference.api import default_model_path

    if args.smoke:
        ckpt, whisper_path, audio, refs = smoke_inputs(work)
        args.max_new_tokens, args.repeats = 8, 1
    else:
        ckpt = Path(args.model) if args.model else default_model_path()
        audio, refs = held_out_clips(args.clips)
    device = torch.device("cpu")
    model, recipe, _ = load_checkpoint(ckpt, device)
    whisper_path = whisper_path if args.smoke else recipe.model.encoder.path
    precision = resolve_precision(recipe.train.precision, device, "decode")
    audio_s = sum(len(a) for a in audio) / 16000
    isa = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}, "
          f"{isa or 'native ISA'}; {len(audio)} clips, "
          f"{audio_s:.1f} s of audio; torch decodes in {precision}", flush=True)

    systems = {"steermoe torch": SteerMoE(TorchBackend(model, precision))}
    if not args.no_onnx:
        systems["steermoe onnxruntime"] = SteerMoE(onnx_backend(ckpt, args.onnx_dir, work, args.smoke))
    whisper = WhisperDecoderBaseline(whisper_path)

    def decode(name: str, bs: int) -> list[str]:
        if name == "whisper tiny.en decoder":
            return [h for k in range(0, len(audio), bs) for h in whisper.transcribe(audio[k : k + bs], args.max_new_tokens)]
        return [r.text for r in systems[name].transcribe(audio, batch_size=bs, max_new_tokens=args.max_new_tokens)]

    names = [*systems, "whisper tiny.en decoder"]
    for name in names:  # warm-up: first-call allocations and kernel choices are not decoding
        decode(name, 1) if args.smoke else (systems[name].transcribe(audio[:1], max_new_tokens=4) if name in systems
                                            else whisper.transcribe(audio[:1], 4))
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        walls: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[float]] = {n: [] for n in names}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for name in names:
                t, c = time.perf_counter(), time.process_time()
                texts[name] = decode(name, bs)
                walls[name].append(time.perf_counter() - t)
                cpus[name].append(time.process_time() - c)  # every thread of this process: what a busy machine cannot inflate
        for name in names:
            wall = min(walls[name])
            wer = word_error_rate(refs, texts[name]) if any(refs) else None
            same = sum(a == b for a, b in zip(texts[name], texts["steermoe torch"]))
            cpu = min(cpus[name])
            rows.append({"system": name, "batch": bs, "wall_s": round(wall, 2), "real_time_factor": round(audio_s / wall, 1),
                         "cpu_s": round(cpu, 2), "audio_s_per_cpu_s": round(audio_s / cpu, 1),
                         "wer": None if wer is None else round(100 * wer, 1), "same_text_as_torch": same, "clips": len(audio)})
            print(f"batch {bs:2d} {name:24s}: {wall:6.1f} s wall (best of {args.repeats}), real_time_factor {audio_s / wall:6.1f}x, "
                  f"{cpu:6.1f} CPU s ({audio_s / cpu:5.1f} audio s per CPU s)"
                  + (f", WER {100 * wer:5.1f}%" if wer is not None else "")
                  + (f", same text as torch {same}/{len(audio)}" if name != "whisper tiny.en decoder" else ""), flush=True)
        theirs = min(walls["whisper tiny.en decoder"])
        for name in (n for n in walls if n.startswith("steermoe")):
            print(f"batch {bs:2d}: {name} at {theirs / min(walls[name]):.2f}x the speed of Whisper's own decoder", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"audio_s": audio_s, "precision": str(precision), "isa": isa, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
