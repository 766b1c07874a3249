"""``load_audio(path)`` -> float32 mono 16 kHz (docs/design.md#audio).

soundfile reads WAV/FLAC/OGG already at 16 kHz directly; everything else (MP3, M4A, video, other
sample rates) is decoded and resampled by ffmpeg. When no ffmpeg is on PATH, the binary shipped in
the ``imageio-ffmpeg`` wheel is used, so ``pip install`` is enough. ffmpeg is called directly, as
Whisper does, rather than through pydub: pydub probes every non-WAV file with ``ffprobe``, which
that wheel does not ship, so it would fail on exactly the machines this fallback exists for.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from steermoe_core.errors import AudioError

SAMPLE_RATE = 16_000
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga"}
AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES | {".mp3", ".m4a", ".aac", ".opus", ".wma", ".webm", ".mp4", ".mkv", ".mov", ".aiff", ".aif"}
SILENCE_PEAK = 1e-4  # -80 dBFS: below this a clip carries nothing to transcribe



@functools.lru_cache(maxsize=1)
def ffmpeg_binary() -> str:
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        raise AudioError("no ffmpeg found: install ffmpeg or the imageio-ffmpeg package") from None


def _via_soundfile(path: Path) -> np.ndarray | None:
    """Audio if soundfile can read it at 16 kHz; None to fall through to ffmpeg."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:
        return None
    if info.samplerate != SAMPLE_RATE:
        return None
    try:
        audio, _ = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: damaged or truncated {info.format} file ({str(e).strip().splitlines()[-1]})") from None
    if info.frames and len(audio) < info.frames:
        raise AudioError(f"{path}: truncated {info.format} file ({len(audio)} of {info.frames} samples)")
    return audio.mean(axis=1)


def _via_ffmpeg(path: Path) -> np.ndarray:
    cmd = [ffmpeg_binary(), "-nostdin", "-v", "error", "-threads", "0", "-i", str(path),
           "-map", "0:a:0", "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        # drop ffmpeg's "[demuxer @ 0x55...]" prefixes: the message must not vary from run to run
        text = re.sub(r"\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", proc.stderr.decode(errors="replace"))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Invalid data" in ln), lines[-1] if lines else f"ffmpeg exit code {proc.returncode}")
        if "matches no streams" in reason:
            reason = "no audio stream"
        raise AudioError(f"{path}: not audio, or unreadable ({reason[-160:]})")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def load_audio(path: str | Path, allow_silent: bool = False) -> np.ndarray:
    """Float32 mono at 16 kHz, or an AudioError that says which file and why."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    audio = _via_soundfile(path)
    if audio is None:
        audio = _via_ffmpeg(path)
    if audio.size == 0:
        raise AudioError(f"{path}: contains no audio samples")
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if not allow_silent and float(np.abs(audio).max()) < SILENCE_PEAK:
        raise AudioError(f"{path}: silent (peak below -80 dBFS)")
    return np.ascontiguousarray(audio, dtype=np.float32)


def is_audio_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES
