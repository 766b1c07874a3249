"""Long audio: cut into windows of at most 30 s at low-energy points (docs/design.md#audio; docs/long_audio.md).

Cutting in the quietest stretch of the last third of each window keeps words whole far more often
than fixed 30 s slices, at no model cost.
"""

from __future__ import annotations

import numpy as np

from steermoe_core.audio.load import SAMPLE_RATE

FRAME = 400  # 25 ms energy frames
HOP = 160  # 10 ms


def split_points(audio: np.ndarray, max_seconds: float = 30.0, min_seconds: float = 20.0) -> list[tuple[int, int]]:
    """(start, end) sample spans covering ``audio``; each at most ``max_seconds`` long."""
    n = len(audio)
    max_len, min_len = int(max_seconds * SAMPLE_RATE), int(min_seconds * SAMPLE_RATE)
    if n <= max_len:
        return [(0, n)]
    spans, start = [], 0
    while n - start > max_len:
        lo, hi = start + min_len, start + max_len
        seg = audio[lo:hi].astype(np.float64)
        frames = 1 + max(0, (len(seg) - FRAME) // HOP)
        idx = np.arange(FRAME)[None, :] + HOP * np.arange(frames)[:, None]
        energy = (seg[idx] ** 2).mean(axis=1)
        smooth = np.convolve(energy, np.ones(15) / 15, mode="same")  # 150 ms: a pause, not a plosive gap
        cut = lo + int(np.argmin(smooth)) * HOP + FRAME // 2
        spans.append((start, cut))
        start = cut
    spans.append((start, n))
    return spans
