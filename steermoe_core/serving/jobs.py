"""Requests in flight: a planned request (``inference.plan``) run on the batcher, as futures.

A route plans the request, then ``Jobs.start`` queues its rows and returns a ``Ticket`` at once (a
full queue answers 503 here, before any work); ``Jobs.outcome`` awaits the finished ``Outcome`` and
drops the work of a client that hangs up; ``Jobs.events`` streams it as server-sent events.

The transcript strategy runs in two steps, as `infer` runs it: the segments are decoded as a
transcript (batched with everything else), then ``plan.answer`` runs the instruction over the text
on a worker thread, each of its LLM calls queued as a text-only job (so it batches with other chats)
and awaited on a ``concurrent.futures.Future``. Follow-up calls of an admitted request skip the
queue cap; only new requests are refused when the server is full. Only the final answer streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from steermoe_core.generation.chat import chat_ids
from steermoe_core.inference.plan import REFUSAL_STATUS, Plan, Refusal, answer, assemble
from steermoe_core.inference.result import Result
from steermoe_core.serving.batcher import Batcher, Job, QueueFull, Row
from steermoe_core.serving.protocol import ApiError, internal_error

log = logging.getLogger("steermoe.serve")


class _Departed(Exception):
    """The client went away: the rest of its request's LLM calls are dropped."""


@dataclass
class Outcome:
    """What a request produced: its ``Result`` (text, segments, warnings, strategy, transcript,
    rounds), the tokens it generated, the prompt tokens it used, and why it stopped."""

    result: Result
    output_tokens: int = 0
    text_tokens: int = 0
    audio_tokens: int = 0
    finish_reason: str = "stop"
    refusal: Refusal | None = None
    error: BaseException | None = None


@dataclass
class Ticket:
    """A request in flight: its outcome future, its text deltas (when streamed), and its jobs."""

    done: asyncio.Future
    deltas: asyncio.Queue | None
    jobs: list[Job] = field(default_factory=list)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        for job in self.jobs:
            job.cancelled.set()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def refusal_error(refusal: Refusal) -> ApiError:
    status = REFUSAL_STATUS.get(refusal.code, 400)
    return ApiError(status, refusal.message, "server_error" if status >= 500 else "invalid_request_error", refusal.code)


class Jobs:
    """The routes' way onto the batcher."""

    def __init__(self, batcher: Batcher, max_queue: int):
        self.batcher, self.backend, self.max_queue = batcher, batcher.backend, max_queue
        self.running: set[asyncio.Task] = set()  # transcript strategies between their two steps

    # -- starting --
    def _ticket(self, stream: bool) -> tuple[Ticket, Callable[[str], None] | None]:
        loop = asyncio.get_running_loop()
        ticket = Ticket(loop.create_future(), asyncio.Queue() if stream else None)
        on_delta = (lambda text: loop.call_soon_threadsafe(ticket.deltas.put_nowait, text)) if stream else None
        return ticket, on_delta

    def _submit(self, ticket: Ticket, job: Job, on_done: Callable[[Job], None], admitted: bool = False) -> None:
        loop = ticket.done.get_loop()
        job.on_done = lambda j: loop.call_soon_threadsafe(on_done, j)
        ticket.jobs.append(job)
        try:
            self.batcher.submit(job, force=admitted)
        except QueueFull:
            raise ApiError(503, f"the server is busy ({self.max_queue} requests waiting); retry shortly",
                           "server_error", "queue_full", headers={"Retry-After": "1"}) from None

    def start(self, plan: Plan, temperature: float, stream: bool, answer_tokens: int,
              then: Callable[[Result], Row] | None = None) -> Ticket:
        """Queue a planned request about audio; the outcome's result is the planner's ``Result``.
        ``then(result)``: a text-only row to run once the transcript is in (a chat with tools over
        what was said); its answer becomes the result's text, the transcript stays in ``transcript``."""
        ticket, on_delta = self._ticket(stream)
        out = Outcome(Result(plan.name, audio_s=plan.audio_s, strategy=plan.strategy))
        if not plan.rows:  # no speech, or refused by the planner: nothing to decode
            out.refusal = assemble(plan, [], [], out.result)
            ticket.done.set_result(out)
            return ticket
        rows = [Row(clips=r.clips, prompt=r.prompt, budget=r.budget) for r in plan.rows]
        out.text_tokens = sum(self.backend.prompt_tokens(r.prompt) for r in rows)
        out.audio_tokens = sum(sum(self.backend.audio_token_counts([len(c) for c in r.clips])) for r in rows)
        two_steps = bool(plan.instruction) or then is not None
        job = Job("audio", rows, 0.0 if two_steps else temperature, audio_s=plan.audio_s,
                  on_delta=None if two_steps else on_delta)

        def decoded(j: Job) -> None:
            out.output_tokens = sum(j.tokens)
            out.finish_reason = "length" if "budget" in j.flags else "stop"
            if j.error is not None or j.cancelled.is_set():
                out.error = j.error
            else:
                out.refusal = assemble(plan, j.texts, j.flags, out.result)
                if then is not None and out.refusal is None:
                    out.result.transcript = out.result.text
                    try:
                        return self._follow(ticket, out, then(out.result), temperature, on_delta)
                    except ApiError as e:  # the follow-up's own refusal (a bad tool schema, a full disk...)
                        out.refusal = Refusal(e.code or "invalid_request", e.message)
                if two_steps and out.refusal is None:
                    task = asyncio.ensure_future(self._answer(ticket, plan, out, temperature, answer_tokens, on_delta))
                    self.running.add(task)  # held, so it is not collected while it runs
                    task.add_done_callback(self.running.discard)
                    return
            if not ticket.done.done():
                ticket.done.set_result(out)

        self._submit(ticket, job, decoded)
        return ticket

    def _follow(self, ticket: Ticket, out: Outcome, row: Row, temperature: float, on_delta) -> None:
        """A text-only row after a transcript, within the same request (it skips the queue cap)."""
        out.text_tokens += len(row.ids)

        def decoded(j: Job) -> None:
            out.output_tokens += sum(j.tokens)
            out.finish_reason = "length" if "budget" in j.flags else "stop"
            out.error = j.error
            out.result.text = j.texts[0] if j.texts else ""
            if not ticket.done.done():
                ticket.done.set_result(out)

        self._submit(ticket, Job("text", [row], temperature, on_delta=on_delta), decoded, admitted=True)

    def start_text(self, row: Row, temperature: float, stream: bool) -> Ticket:
        """Queue a text-only chat on the frozen LLM (``row.ids``, its budget, an optional constraint)."""
        ticket, on_delta = self._ticket(stream)
        out = Outcome(Result("chat"), text_tokens=len(row.ids))

        def decoded(j: Job) -> None:
            out.output_tokens, out.error = sum(j.tokens), j.error
            out.finish_reason = "length" if "budget" in j.flags else "stop"
            out.result.text = j.texts[0] if j.texts else ""
            if not ticket.done.done():
                ticket.done.set_result(out)

        self._submit(ticket, Job("text", [row], temperature, on_delta=on_delta), decoded)
        return ticket

    async def _answer(self, ticket: Ticket, plan: Plan, out: Outcome, temperature: float, answer_tokens: int,
                      on_delta: Callable[[str], None] | None) -> None:
        """The transcript strategy's second step (``plan.answer``), its LLM calls queued as text jobs."""
        def chat(messages: list[dict], n: int, final: bool) -> str:  # on a worker thread
            if ticket.cancelled:
                raise _Departed
            ids = chat_ids(self.backend, messages)
            finished: Future = Future()
            job = Job("text", [Row(ids=ids, budget=n)], temperature if final else 0.0, on_delta=on_delta if final else None)
            job.on_done = finished.set_result
            ticket.jobs.append(job)
            self.batcher.submit(job, force=True)
            finished.result()
            if job.error is not None:
                raise job.error
            if job.cancelled.is_set():
                raise _Departed
            out.text_tokens += len(ids)
            out.output_tokens += sum(job.tokens)
            if final:
                out.finish_reason = "length" if "budget" in job.flags else "stop"
            return job.texts[0]

        def count(messages: list[dict]) -> int:
            return len(chat_ids(self.backend, messages))

        try:
            out.refusal = await asyncio.to_thread(answer, plan, out.result, chat, count, self.backend.max_context, answer_tokens)
        except _Departed:
            pass
        except Exception as e:
            log.error("the transcript strategy failed on %s:\n%s", plan.name, traceback.format_exc())
            out.error = e
        finally:
            if not ticket.done.done():
                ticket.done.set_result(out)

    # -- waiting --
    async def outcome(self, request, ticket: Ticket) -> Outcome:
        """The finished outcome; a client that hangs up first has its work dropped. An error or a
        refusal is raised as the client's answer."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({ticket.done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not ticket.done.done():
            ticket.cancel()
            raise asyncio.CancelledError
        return checked(request, ticket.done.result())

    async def events(self, ticket: Ticket, first: Callable[[], list], delta: Callable[[str], dict | list[dict]],
                     last: Callable[[Outcome], list]) -> AsyncIterator[str]:
        """SSE: ``first()`` events, the ``delta(text)`` event(s) of each piece of text, ``last(outcome)``
        events, then ``[DONE]``; an error after the stream began is an ``error`` event."""
        try:
            for ev in first():
                yield _sse(ev)
            async for text in streamed(ticket):
                for ev in _listed(delta(text)):
                    yield _sse(ev)
            try:
                out = checked(None, ticket.done.result())
            except ApiError as e:
                yield _sse(e.body())
            else:
                for ev in last(out):
                    yield _sse(ev)
            yield "data: [DONE]\n\n"
        finally:
            if not ticket.done.done():
                ticket.cancel()


async def streamed(ticket: Ticket) -> AsyncIterator[str]:
    """Each piece of a streamed ticket's text as it comes, until the ticket is done (what arrived
    with the end included): what the SSE routes and the realtime route send."""
    getter = None
    try:
        while True:
            getter = getter or asyncio.ensure_future(ticket.deltas.get())
            finished, _ = await asyncio.wait({getter, ticket.done}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in finished:
                getter.cancel()  # before draining: a pending get must not take an item
                getter = None
                break
            yield getter.result()
            getter = None
        while not ticket.deltas.empty():
            yield ticket.deltas.get_nowait()
    finally:
        if getter is not None:
            getter.cancel()


def _listed(ev: dict | list[dict]) -> list[dict]:
    return ev if isinstance(ev, list) else [ev]


def checked(request, out: Outcome) -> Outcome:
    """``out``, or its error (a 500 whose traceback is in the log) or refusal raised as an ``ApiError``."""
    if out.error is not None:
        log.error("request on %s failed (traceback above)", request.url.path if request is not None else "a stream")
        raise internal_error()
    if out.refusal is not None:
        raise refusal_error(out.refusal)
    return out


async def _disconnected(request) -> None:
    """Returns when the client hangs up (the body is already read, so the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
