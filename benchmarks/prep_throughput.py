"""Prep throughput on LibriSpeech-shaped input: seconds of audio prepared per second of wall time.

Builds a LibriSpeech-layout tree of 16 kHz FLAC clips (speech-like noise, durations drawn like
LibriSpeech's: mean ~12.7 s, 1-30 s), runs the same code as `steermoe prep librispeech`, and prints
real-time factor overall and per core, plus prepared size per hour beside the reference's 1.5 MB of
log-mel features per utterance.

    python benchmarks/prep_throughput.py [--utterances 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from steermoe_core.data.prep.pipeline import run_prep
from steermoe_core.data.prep.sources import librispeech

REFERENCE_MB_PER_UTT = 1.5  # the reference stores 128 x 3000 float32 log-mel per utterance


def librispeech_durations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(shape=6.0, scale=12.7 / 6.0, size=n), 1.0, 30.0)


def make_tree(root: Path, n: int, fmt: str) -> float:
    rng = np.random.default_rng(1)
    total = 0.0
    for i, d in enumerate(librispeech_durations(n)):
        spk, ch = 100 + i // 50, 1000 + i // 25
        folder = root / "train-clean-100" / str(spk) / str(ch)
        folder.mkdir(parents=True, exist_ok=True)
        uid = f"{spk}-{ch}-{i:04d}"
        t = np.arange(int(d * 16000)) / 16000
        env = 0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t) ** 2  # syllable-rate envelope: compresses like speech
        audio = (0.1 * env * rng.standard_normal(len(t)) * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
        if fmt == "flac":
            sf.write(folder / f"{uid}.flac", audio, 16000, subtype="PCM_16")
        else:  # 44.1 kHz WAV: the decode + resample (ffmpeg) + FLAC encode path
            sf.write(folder / f"{uid}.flac", np.zeros(1600, np.float32), 16000, subtype="PCM_16")
            t44 = np.arange(int(d * 44100)) / 44100
            sf.write(folder / f"{uid}.wav", np.interp(t44, t, audio).astype(np.float32), 44100, subtype="PCM_16")
        with open(folder / f"{spk}-{ch}.trans.txt", "a") as f:
            f.write(f"{uid} SOME WORDS SPOKEN IN THE CLIP\n")
        total += d
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=200)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--input", choices=["flac", "wav44k"], default="flac",
                    help="flac: LibriSpeech's own 16 kHz FLAC (stored as is); wav44k: decode, resample, re-encode")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "LibriSpeech", Path(tmp) / "prepared"
        audio_s = make_tree(src, args.utterances, args.input)
        t0 = time.perf_counter()
        items, skipped, split = librispeech(src)
        if args.input == "wav44k":
            items = [type(it)(it.id, it.text, it.path[:-5] + ".wav", language="en") for it in items]
        src_bytes = sum(Path(it.path).stat().st_size for it in items)
        run_prep(items, out, "librispeech", split, skipped, workers=args.workers, shard_size=100)
        wall = time.perf_counter() - t0
        out_bytes = sum(p.stat().st_size for p in out.glob("*.parquet"))
    hours = audio_s / 3600
    print(f"utterances            {args.utterances}")
    print(f"audio                 {audio_s:.0f} s ({hours:.3f} h)")
    print(f"input                 {args.input}")
    print(f"workers               {args.workers}")
    print(f"wall time             {wall:.2f} s")
    print(f"real-time factor      {audio_s / wall:.0f}x overall, {audio_s / wall / args.workers:.0f}x per core")
    print(f"prepared size         {out_bytes / 1e6 / hours:.1f} MB per hour (source files {src_bytes / 1e6 / hours:.1f} MB per hour)")
    print(f"reference features    {REFERENCE_MB_PER_UTT * 3600 / 12.7:.0f} MB per hour ({REFERENCE_MB_PER_UTT} MB per utterance)")


if __name__ == "__main__":
    main()
