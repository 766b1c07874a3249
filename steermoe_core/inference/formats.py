"""Output formats of `steermoe infer` beyond plain text."""

from __future__ import annotations

from steermoe_core.inference.api import Result


def to_srt(result: Result) -> str:
    def ts(t: float) -> str:
        ms = int(round(t * 1000))
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

    return "".join(f"{i}\n{ts(s.start)} --> {ts(s.end)}\n{s.text}\n\n" for i, s in enumerate(result.segments, 1))
