"""Speech synthesised from text with Debian's flite and espeak-ng: training data with no downloads.

Several voices and speaking rates give the variety a tiny demo needs to generalise to real speech.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from steermoe_core.audio.load import AudioError, load_audio
from steermoe_core.data.prep.item import Item
from steermoe_core.errors import UsageError

DEFAULT_VOICES = ["flite:slt", "flite:rms", "flite:awb", "flite:kal16", "espeak:en-us", "espeak:en-gb"]
DEFAULT_SPEEDS = [0.9, 1.0, 1.15]


def parse_voice(spec: str) -> tuple[str, str]:
    engine, _, voice = spec.partition(":")
    if engine not in {"flite", "espeak"} or not voice:
        raise UsageError(f"voice {spec!r}: expected flite:NAME or espeak:NAME (e.g. flite:slt, espeak:en-us)")
    binary = "flite" if engine == "flite" else "espeak-ng"
    if shutil.which(binary) is None:
        raise UsageError(f"voice {spec!r} needs {binary} on PATH (Debian: apt-get install {binary})")
    return engine, voice


def synthesize(text: str, engine: str, voice: str, speed: float) -> np.ndarray:
    """Float32 mono 16 kHz speech for ``text``; ``speed`` > 1 speaks faster."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        if engine == "flite":
            cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={1.0 / speed:.3f}", "-t", text, "-o", str(wav)]
        else:
            cmd = ["espeak-ng", "-v", voice, "-s", str(int(round(165 * speed))), "-w", str(wav), text]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not wav.exists():
            raise AudioError(f"{engine}:{voice} failed on {text[:40]!r} ({proc.stderr.strip()[:120]})")
        return load_audio(wav)


def synth_items(texts_file: Path, voices: list[str], speeds: list[float], copies: int = 1, prefix: str = "synth") -> tuple[list[Item], list[dict]]:
    """One item per (line, copy); voice and speed rotate so neighbouring lines differ."""
    if not texts_file.is_file():
        raise UsageError(f"{texts_file}: no such text file")
    parsed = [parse_voice(v) for v in voices]
    items, skipped = [], []
    lines = texts_file.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        for c in range(copies):
            engine, voice = parsed[(n + c) % len(parsed)]
            speed = speeds[(n * 7 + c * 3) % len(speeds)]
            # the voice and speed travel in the row's `extra` column, for per-voice scores of held-out voices
            items.append(Item(f"{prefix}-{n:06d}-{c}", text, synth=(engine, voice, speed), language="en",
                              extra={"voice": f"{engine}:{voice}", "speed": speed}))
    if not items:
        skipped.append({"id": "-", "input": str(texts_file), "reason": "no non-empty lines"})
    return items, skipped
