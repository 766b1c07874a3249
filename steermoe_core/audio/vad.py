"""Voice activity: where a recording has speech, so long audio is cut into segments the model can read.

A model trained on sentences of a few seconds loses the audio and loops when it is asked to read a
30 s window, and invents text over silence or low noise. Cutting at voice activity (as WhisperX
does) gives it segments like the ones it trained on, and gives silence no segment at all.

Two detectors, same output (a speech probability per 32 ms frame):

- ``silero``: Silero VAD's ONNX model as the ``silero-vad`` wheel ships it (``silero_vad/data/``),
  run with onnxruntime alone, one call per 16 s block (its "sequence" export). The wheel is found
  without importing it (its ``__init__`` pulls torchaudio); ``make setup`` installs it with
  ``--no-deps``. About 2 ms per second of audio on one CPU core.
- ``energy``: frame loudness against the recording's own noise floor and an absolute floor
  (-50 dBFS). Used when the wheel is missing, and for sounds Silero is not meant for (tones in
  tests). On speech joined with pauses it finds the same pauses (see ``tests/test_longform.py``).

Whatever the detector, a frame quieter than ``SILENCE_DBFS`` is never speech: low noise at
-66 dBFS and digital silence yield no segment, and so does a clip shorter than ``MIN_SPEECH_S``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from steermoe_core.audio.load import SAMPLE_RATE

FRAME = 512  # 32 ms: Silero's frame at 16 kHz
CONTEXT = 64  # samples of the previous frame Silero's model sees before each frame
SILENCE_DBFS = -55.0  # frames quieter than this are never speech (low noise is about -66 dBFS)
ENERGY_FLOOR_DBFS = -50.0  # the energy detector's absolute floor
MIN_SPEECH_S = 0.2  # a region shorter than this is a click, not a word
MIN_SILENCE_S = 0.3  # a pause shorter than this does not end a region (a stop consonant's gap)
PAD_S = 0.15  # kept on each side of a region, so word edges are not cut
METHODS = ("auto", "silero", "energy")


def silero_model_path() -> Path | None:
    """The sequence-export ONNX model inside the installed ``silero-vad`` wheel, or None."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = Path(root) / "data" / "silero_vad_16k_sequence.onnx"
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=1)
def _silero_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def silero_probs(audio: np.ndarray, block: int = 512) -> np.ndarray:
    """Speech probability per 32 ms frame from Silero VAD (onnxruntime, no torch)."""
    path = silero_model_path()
    if path is None:
        raise RuntimeError("silero-vad is not installed (pip install --no-deps silero-vad)")
    sess = _silero_session(str(path))
    n = (len(audio) + FRAME - 1) // FRAME
    if n == 0:
        return np.zeros(0, np.float32)
    frames = np.zeros((n, FRAME), np.float32)
    frames.reshape(-1)[: len(audio)] = audio
    ctx = np.zeros((n, CONTEXT), np.float32)
    ctx[1:] = frames[:-1, -CONTEXT:]
    x = np.concatenate([ctx, frames], axis=1)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    out = []
    for k in range(0, n, block):
        p, h, c = sess.run(["speech_probs", "hn", "cn"], {"input": x[k : k + block], "h": h, "c": c})
        out.append(p.reshape(-1))
    return np.concatenate(out).astype(np.float32)


def frame_dbfs(audio: np.ndarray) -> np.ndarray:
    """RMS level of each 32 ms frame in dBFS (the last frame zero-padded)."""
    n = (len(audio) + FRAME - 1) // FRAME
    frames = np.zeros((n, FRAME), np.float64)
    frames.reshape(-1)[: len(audio)] = audio
    rms = np.sqrt((frames**2).mean(axis=1) + 1e-20)
    return 20 * np.log10(rms)


def energy_probs(audio: np.ndarray) -> np.ndarray:
    """A speech 'probability' per frame from loudness alone: 0 at the noise floor + 6 dB (or -50 dBFS,
    whichever is higher), 1 from 12 dB above that, smoothed over 96 ms."""
    db = frame_dbfs(audio)
    if len(db) == 0:
        return np.zeros(0, np.float32)
    floor = max(ENERGY_FLOOR_DBFS, float(np.percentile(db, 10)) + 6.0)
    p = np.clip((db - floor) / 12.0, 0.0, 1.0)
    return np.convolve(p, np.ones(3) / 3, mode="same").astype(np.float32)


def speech_probs(audio: np.ndarray, method: str = "auto") -> tuple[np.ndarray, str]:
    """(probability per 32 ms frame, the detector used); frames below ``SILENCE_DBFS`` are 0 whatever it says."""
    if method not in METHODS:
        raise ValueError(f"vad method {method!r} is not one of {METHODS}")
    if method == "silero" or (method == "auto" and silero_model_path() is not None):
        probs, used = silero_probs(audio), "silero"
    else:
        probs, used = energy_probs(audio), "energy"
    probs = probs.copy()
    probs[frame_dbfs(audio)[: len(probs)] < SILENCE_DBFS] = 0.0
    return probs, used


def speech_regions(
    probs: np.ndarray, n_samples: int, threshold: float = 0.5, neg_threshold: float = 0.35,
    min_speech_s: float = MIN_SPEECH_S, min_silence_s: float = MIN_SILENCE_S, pad_s: float = PAD_S,
) -> list[tuple[int, int]]:
    """(start, end) sample spans of speech: enter above ``threshold``, leave after ``min_silence_s``
    below ``neg_threshold`` (hysteresis, as Silero's own timestamps do), padded by ``pad_s`` each side."""
    fs = FRAME / SAMPLE_RATE
    min_sil = max(1, round(min_silence_s / fs))
    regions: list[list[int]] = []
    start, quiet = None, 0
    for i, p in enumerate(probs):
        if start is None:
            if p >= threshold:
                start, quiet = i, 0
        elif p < neg_threshold:
            quiet += 1
            if quiet >= min_sil:
                regions.append([start, i - quiet + 1])
                start = None
        else:
            quiet = 0
    if start is not None:
        regions.append([start, len(probs) - quiet])
    pad = round(pad_s * SAMPLE_RATE)
    out = []
    for a, b in regions:
        if (b - a) * fs < min_speech_s:
            continue
        s, e = max(0, a * FRAME - pad), min(n_samples, b * FRAME + pad)
        if out and s <= out[-1][1]:  # the padding of two regions overlaps: one region
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def segment_speech(
    audio: np.ndarray, max_seconds: float, method: str = "auto", merge_gap_s: float = 1.0, join_seconds: float = 0.0
) -> tuple[list[tuple[int, int]], str]:
    """Speech segments of at most ``max_seconds`` and the detector used. Neighbouring regions are
    joined while the result stays within ``join_seconds`` (0 = ``max_seconds``) and the pause between
    them is at most ``merge_gap_s`` (fewer, fuller segments; still like what the model trained on); a
    region longer than ``max_seconds`` is cut at its least speech-like frames."""
    probs, used = speech_probs(audio, method)
    regions = speech_regions(probs, len(audio))
    max_len = int(max_seconds * SAMPLE_RATE)
    join_len = int(join_seconds * SAMPLE_RATE) if join_seconds > 0 else max_len
    pieces: list[tuple[int, int]] = []
    for s, e in regions:
        while e - s > max_len:
            lo = s + max_len // 2
            p = probs[lo // FRAME : (s + max_len) // FRAME]
            cut = (lo // FRAME + int(np.argmin(p))) * FRAME if len(p) else s + max_len
            cut = min(max(cut, s + FRAME), s + max_len)
            pieces.append((s, cut))
            s = cut
        pieces.append((s, e))
    merged: list[tuple[int, int]] = []
    for s, e in pieces:
        if merged and e - merged[-1][0] <= join_len and s - merged[-1][1] <= merge_gap_s * SAMPLE_RATE:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged, used


def is_silent(audio: np.ndarray) -> bool:
    """No frame above ``SILENCE_DBFS`` for ``MIN_SPEECH_S``, or shorter than that: nothing to read."""
    if len(audio) < MIN_SPEECH_S * SAMPLE_RATE:
        return True
    loud = frame_dbfs(audio) >= SILENCE_DBFS
    return int(loud.sum()) * FRAME < MIN_SPEECH_S * SAMPLE_RATE
