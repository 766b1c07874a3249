"""Asking a trained model about audio: the Python API behind `steermoe infer`.

    from steermoe_core.inference import SteerMoE
    sm = SteerMoE.load("runs/demo/model")          # load once (the torch backend)
    sm.transcribe(["a.wav", "b.mp3"])              # call many times
    sm.ask("meeting.wav", "Summarize the main points.")
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from steermoe_core.audio import (
    SAMPLE_RATE,
    AudioError,
    is_audio_file,
    load_audio,
    split_points,
)
from steermoe_core.errors import ModelNotFound
from steermoe_core.inference.backend import Backend

TASK_PROMPTS = {
    "transcribe": "Transcribe the audio.",
    "summarize": "Summarize the main points of the audio.",
}



@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Result:
    path: str
    text: str = ""
    error: str | None = None
    audio_s: float = 0.0
    wall_s: float = 0.0
    rtf: float = 0.0  # audio seconds per wall second (higher is faster)
    segments: list[Segment] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def default_model_path() -> Path:
    """STEERMOE_MODEL, else the checkpoint the offline demo trains, else a clear error."""
    env = os.environ.get("STEERMOE_MODEL")
    if env:
        return Path(env)
    from steermoe_core.backbones.weights import cache_root

    demo = cache_root() / "demo" / "steermoe" / "model"
    if (demo / "adapter.safetensors").exists():
        return demo
    raise ModelNotFound(
        "no model given: pass --model CKPT, set STEERMOE_MODEL, or run `make demo` to train the offline demo model"
    )


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files as given, folders recursively (supported formats, sorted), globs expanded; input order kept.

    A name that matches nothing is returned as is, so it gets its own error record.
    """
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if is_audio_file(f)))
        elif any(c in raw for c in "*?[") and not p.exists():
            out.extend(Path(m) for m in sorted(glob.glob(raw, recursive=True)) if Path(m).is_file())
        else:
            out.append(p)
    return out


@dataclass
class _Job:
    index: int
    path: str
    windows: list[tuple[int, int]]
    audio: np.ndarray


class SteerMoE:
    """A loaded backend plus the batching, windowing and timing around it (shared by every backend)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", trust_remote_code: bool = False) -> SteerMoE:
        """A checkpoint on the torch backend (``trust_remote_code`` only from the caller, never the checkpoint)."""
        from steermoe_core.inference.torch_backend import TorchBackend

        return cls(TorchBackend.load(path or default_model_path(), device, trust_remote_code))

    @property
    def max_context(self) -> int:
        return self.backend.max_context

    def _context_needed(self, job: _Job, prompt: str) -> int:
        return self.backend.prompt_tokens(prompt) + sum(self.backend.audio_token_counts([e - s for s, e in job.windows]))

    def ask(
        self,
        inputs: str | Path | np.ndarray | list,
        prompt: str = TASK_PROMPTS["transcribe"],
        transcribe: bool | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        num_beams: int = 1,
        streamer=None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Result]:
        """One Result per input, in input order; a bad input gets an error Result, the rest go on.

        ``transcribe`` (default: prompt is the transcription prompt) decodes each 30 s window on its
        own and joins the texts; any other prompt sees all windows' audio tokens in one prompt.
        """
        items = inputs if isinstance(inputs, list) else [inputs]
        transcribe = (prompt == TASK_PROMPTS["transcribe"]) if transcribe is None else transcribe
        results: list[Result] = []
        jobs: list[_Job] = []
        for i, item in enumerate(items):
            name = "<array>" if isinstance(item, np.ndarray) else str(item)
            try:
                audio = item.astype(np.float32) if isinstance(item, np.ndarray) else load_audio(item)
            except AudioError as e:
                results.append(Result(name, error=str(e)))
                continue
            results.append(Result(name, audio_s=len(audio) / SAMPLE_RATE))
            job = _Job(i, name, split_points(audio), audio)
            if not transcribe:
                need = self._context_needed(job, prompt)
                if need > self.max_context:
                    results[-1].error = (
                        f"{name}: too long for the LLM's context ({need} tokens > {self.max_context}); "
                        "use --task transcribe, or a shorter recording"
                    )
                    continue
            jobs.append(job)

        # Units of work: (job, window) for transcription, whole jobs otherwise; batched by length.
        units = [(j, w) for j in jobs for w in (range(len(j.windows)) if transcribe else [None])]
        units.sort(key=lambda u: -(u[0].windows[u[1]][1] - u[0].windows[u[1]][0] if u[1] is not None else len(u[0].audio)))
        if progress:
            progress(0, len(units))
        texts: dict[tuple[int, int | None], str] = {}
        walls: dict[int, float] = {}
        for k in range(0, len(units), batch_size):
            chunk = units[k : k + batch_size]
            clips, groups = [], []
            for job, w in chunk:
                spans = [job.windows[w]] if w is not None else job.windows
                clips.extend(job.audio[s:e] for s, e in spans)
                groups.append(len(spans))
            t0 = time.perf_counter()
            outs = self.backend.generate(clips, groups, [prompt] * len(chunk), max_new_tokens, num_beams, streamer)
            dt = time.perf_counter() - t0
            total = sum(len(c) for c in clips)
            for (job, w), text, n in zip(chunk, outs, groups):
                texts[(job.index, w)] = text
                share = sum(len(c) for c in clips[:n]) / max(total, 1)
                walls[job.index] = walls.get(job.index, 0.0) + dt * share
                clips = clips[n:]
            if progress:
                progress(len(chunk), len(units))
        for job in jobs:
            r = results[job.index]
            if transcribe:
                r.segments = [Segment(s / SAMPLE_RATE, e / SAMPLE_RATE, texts[(job.index, w)]) for w, (s, e) in enumerate(job.windows)]
                r.text = " ".join(seg.text for seg in r.segments if seg.text)
            else:
                r.text = texts[(job.index, None)]
                r.segments = [Segment(0.0, r.audio_s, r.text)]
            r.wall_s = walls[job.index]
            r.rtf = r.audio_s / r.wall_s if r.wall_s else 0.0
        return results

    def transcribe(self, inputs, **kw) -> list[Result]:
        return self.ask(inputs, TASK_PROMPTS["transcribe"], transcribe=True, **kw)
