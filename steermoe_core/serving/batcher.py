"""One model, many clients: a bounded queue and one worker thread that merges concurrent requests
into backend batches.

Why a thread: the model call blocks for seconds; on the event loop it would freeze every other
connection (``/health`` included). The worker takes the oldest job, adds every compatible job
already waiting (same kind and temperature) up to ``max_batch`` rows, and waits up
to ``max_wait`` for more only while requests are arriving (another one came in within
``max_wait`` before it): a lone request starts at once. Rows are the backend's examples, as the
request planner (``inference.plan``) made them: one per segment of a transcript, one per direct
answer, one per text-only chat. The batcher only batches and decodes rows; what a request means is
the planner's and the routes' business.

Each job gets its own token stream (``Job.on_delta``) even when it shares a batch; a job whose
client went away is dropped before its batch starts, and a batch whose every client went away is
stopped at the next token.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from steermoe_core.generation.chat import complete_texts, decode_audio
from steermoe_core.serving.metrics import Metrics

log = logging.getLogger("steermoe.serve")


class QueueFull(Exception):
    """The bounded queue is full: the caller answers 503 with Retry-After."""


class _AllGone(Exception):
    """Raised inside generation when every job of the batch was cancelled."""


@dataclass
class Row:
    """One backend example: audio clips (its segments, in order) and a prompt, or text-only token ids."""

    clips: list[np.ndarray] = field(default_factory=list)
    prompt: str = ""
    ids: list[int] = field(default_factory=list)
    budget: int = 256  # tokens this row may generate
    constraint: object | None = None  # text rows: a grammar the answer must follow (``generation.tools.Constraint``)


@dataclass
class Job:
    kind: str  # "audio" | "text"
    rows: list[Row]
    temperature: float = 0.0
    audio_s: float = 0.0
    on_delta: Callable[[str], None] | None = None  # called from the worker thread, text in order
    on_done: Callable[[Job], None] | None = None  # called once, from the worker thread
    # filled in by the worker
    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated per row
    stopped: list[bool] = field(default_factory=list)  # row ended on its own (not out of budget)
    flags: list[str | None] = field(default_factory=list)  # per row: None, "budget" (cut), "loop" (one copy kept)
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    _next: int = 0  # first row whose text is not all streamed yet
    _pending: dict = field(default_factory=dict)  # row -> text streamed early (a later window ran first)
    _row_done: set = field(default_factory=set)
    _started: set = field(default_factory=set)
    _emitted_any: bool = False

    @property
    def key(self) -> tuple:
        return self.kind, self.temperature

    @property
    def finish_reason(self) -> str:
        return "length" if "budget" in self.flags else "stop"

    # -- the per-job stream: rows (windows) may run in any order; text comes out in order,
    # windows joined by one space, as the final text joins them --
    def _out(self, row: int, text: str) -> None:
        if self.on_delta is None:
            return
        if row not in self._started:
            text = text.lstrip()
            if not text:
                return
            self._started.add(row)
            if self._emitted_any:
                text = " " + text
        self._emitted_any = True
        self.on_delta(text)

    def row_delta(self, row: int, text: str) -> None:
        if row == self._next:
            self._out(row, text)
        else:
            self._pending[row] = self._pending.get(row, "") + text

    def row_finished(self, row: int) -> None:
        self._row_done.add(row)
        while self._next in self._row_done:
            self._next += 1
            if self._next < len(self.rows):
                self._out(self._next, self._pending.pop(self._next, ""))


class _Streamer:
    """HF/onnx streamer protocol (``put(ids)`` each step, ``end()``) over a whole batch: it splits each
    step's (B,) tokens by row, counts them, and feeds each job's stream with decoded text."""

    def __init__(self, backend, owners: list[tuple[Job, int]]):
        self.backend, self.owners = backend, owners
        self.stops = set(backend.stop_ids) | {backend.pad_id}  # a row stopped by its guard is padded
        self.ids: list[list[int]] = [[] for _ in owners]
        self.shown = [0] * len(owners)
        self.done = [False] * len(owners)
        self.first = True  # transformers' first put is the prompt; onnxruntime's greedy() sends only new tokens

    def put(self, value) -> None:
        value = np.asarray(value)
        if value.ndim == 2 and self.first:  # transformers hands over the prompt first ((B, 0) with inputs_embeds)
            self.first = False
            return
        self.first = False
        if all(job.cancelled.is_set() for job, _ in self.owners):
            raise _AllGone
        step = value.reshape(len(self.owners), -1)[:, -1]
        for i, tok in enumerate(step.tolist()):
            if self.done[i]:
                continue
            job, row = self.owners[i]
            if tok in self.stops:
                self.done[i] = True
                job.stopped[row] = True
                continue
            self.ids[i].append(int(tok))
            job.tokens[row] += 1
            if job.on_delta is not None and not job.cancelled.is_set():
                text = self.backend.decode([self.ids[i]])[0]
                if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                    continue
                job.row_delta(row, text[self.shown[i]:])
                self.shown[i] = len(text)

    def end(self) -> None:
        pass


class Batcher:
    """The bounded queue and its worker thread; ``submit`` from any thread, ``close`` to drain and stop."""

    def __init__(self, backend, metrics: Metrics, max_batch: int = 8, max_wait_s: float = 0.01, max_queue: int = 64):
        self.backend, self.metrics = backend, metrics
        self.max_batch, self.max_wait, self.max_queue = max(1, max_batch), max(0.0, max_wait_s), max(1, max_queue)
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.last_arrival = 0.0
        self.thread = threading.Thread(target=self._loop, name="steermoe-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job, force: bool = False) -> None:
        """Queue ``job``; a full queue raises ``QueueFull`` unless ``force`` (the follow-up call of a
        request already admitted: refusing it would waste the work already done for it)."""
        with self.cond:
            if len(self.queue) >= self.max_queue and not force:
                raise QueueFull
            job.texts = [""] * len(job.rows)
            job.tokens = [0] * len(job.rows)
            job.stopped = [False] * len(job.rows)
            job.flags = [None] * len(job.rows)
            job.arrived = time.monotonic()
            self.queue.append(job)
            self.metrics.queue_depth = len(self.queue)
            self.cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(timeout)

    # -- worker --
    def _take(self) -> list[Job] | None:
        with self.cond:
            while True:
                while self.queue and self.queue[0].cancelled.is_set():
                    self._finish(self.queue.popleft())
                if self.queue:
                    break
                if self.closing:
                    return None
                self.cond.wait()
            first = self.queue.popleft()
            burst = first.arrived - self.last_arrival <= self.max_wait  # requests are coming in together
            self.last_arrival = max(self.last_arrival, first.arrived)
            batch, rows = [first], len(first.rows)
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                took = False
                for job in list(self.queue):
                    if job.cancelled.is_set():
                        self.queue.remove(job)
                        self._finish(job)
                    elif job.key == first.key and rows + len(job.rows) <= self.max_batch:
                        self.queue.remove(job)
                        self.last_arrival = max(self.last_arrival, job.arrived)
                        batch.append(job)
                        rows += len(job.rows)
                        took = True
                left = deadline - time.monotonic()
                if rows >= self.max_batch or not (burst or took) or left <= 0 or self.closing:
                    break
                before = len(self.queue)
                self.cond.wait(left)
                if len(self.queue) == before:  # nothing more arrived in time
                    break
            self.metrics.queue_depth = len(self.queue)
            return batch

    def _finish(self, job: Job) -> None:
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:  # a callback into a closed loop must not stop the worker
                log.debug("on_done failed", exc_info=True)

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except _AllGone:
                pass
            except Exception as e:  # the traceback goes to the server log; the clients get a 500; the next batch runs
                log.error("batch of %d request(s) failed:\n%s", len(batch), traceback.format_exc())
                for job in batch:
                    job.error = e
            for job in batch:
                self._finish(job)

    def _run(self, batch: list[Job]) -> None:
        owners = [(job, r) for job in batch for r in range(len(job.rows))]
        first = batch[0]
        for k in range(0, len(owners), self.max_batch):  # one long recording may need several calls
            chunk = owners[k : k + self.max_batch]
            streamer = _Streamer(self.backend, chunk)
            rows = [job.rows[r] for job, r in chunk]
            self.metrics.observe_batch(len(chunk))
            budgets = [row.budget for row in rows]
            if first.kind == "text":
                texts, flags = complete_texts(self.backend, [row.ids for row in rows], budgets, first.temperature, streamer,
                                              [row.constraint for row in rows])
            else:
                clips = [c for row in rows for c in row.clips]
                groups = [len(row.clips) for row in rows]
                texts, flags = decode_audio(self.backend, clips, groups, [row.prompt for row in rows], budgets,
                                            temperature=first.temperature, streamer=streamer)
            for k_row, ((job, r), text, flag) in enumerate(zip(chunk, texts, flags)):
                job.texts[r] = text
                job.flags[r] = flag
                self.metrics.generated_tokens += job.tokens[r]
                if job.on_delta is not None and not job.cancelled.is_set():
                    _top_up(job, r, text, streamer, k_row)
                    job.row_finished(r)
        for job in batch:
            self.metrics.audio_seconds += job.audio_s


def _top_up(job: Job, row: int, final: str, streamer: _Streamer, i: int) -> None:
    """What the token stream did not show of a row's final text (its last characters, held back
    while they might be half a character), so the deltas add up to the final text."""
    shown = streamer.backend.decode([streamer.ids[i]])[0][: streamer.shown[i]].lstrip()
    if final.startswith(shown) and len(final) > len(shown):
        job.row_delta(row, final[len(shown):])
