"""Output formats shared by `steermoe infer` and `steermoe serve`: text, srt, vtt, json, jsonl and
OpenAI's ``verbose_json``. Pure functions over ``Result`` records, so both front ends render the
same bytes for the same result."""

from __future__ import annotations

import json

from steermoe_core.inference.result import Result, Segment


def _clock(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _spoken(segments: list[Segment]) -> list[Segment]:
    return [s for s in segments if s.text]


def to_srt(result: Result) -> str:
    """SubRip: numbered cues ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, one per segment."""
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n" for i, s in enumerate(result.segments, 1))


def to_vtt(result: Result) -> str:
    """WebVTT: the header, then one cue per segment with ``.`` before the milliseconds."""
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n" for s in result.segments)


def subtitles(result: Result, fmt: str) -> str:
    """``srt`` or ``vtt`` of one result; an input that failed has none."""
    if result.error:
        return ""
    return to_vtt(result) if fmt == "vtt" else to_srt(result)


def to_text(records: list[Result]) -> str:
    """One line per successful record; several records are prefixed with their path and a tab."""
    many = len(records) > 1
    return "".join((f"{r.path}\t{r.text}\n" if many else f"{r.text}\n") for r in records if not r.error)


def text_line(r: Result) -> str:
    """The line `infer` prints for a finished file while a folder is still running."""
    return f"{r.path}\t{r.text}\n"


def jsonl_line(r: Result, extra: dict | None = None) -> str:
    return json.dumps({**r.to_dict(), **(extra or {})}, ensure_ascii=False) + "\n"


def to_jsonl(records: list[Result]) -> str:
    return "".join(jsonl_line(r) for r in records)


def to_json(records: list[Result]) -> str:
    return json.dumps([r.to_dict() for r in records], ensure_ascii=False, indent=2) + "\n"


def verbose_json(result: Result, language: str = "english") -> dict:
    """OpenAI's ``verbose_json`` transcription: text, duration and segments with start and end (s)."""
    segments = [
        {"id": i, "seek": 0, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text, "tokens": [],
         "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
        for i, s in enumerate(_spoken(result.segments))
    ]
    return {"task": "transcribe", "language": language, "duration": round(result.audio_s, 3), "text": result.text, "segments": segments}
