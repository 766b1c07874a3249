"""``WS /v1/realtime?intent=transcription``: live transcription in OpenAI's Realtime events.

The session logic (events, audio buffer, server VAD) is ``realtime_session.Session``; this module is
the connection: the API key (``Authorization: Bearer KEY``, as the official Python client sends it,
or the ``openai-insecure-api-key.KEY`` subprotocol browsers use), one writer task per connection so
events go out whole and in order, and one task per committed utterance, planned as a transcript by
the request planner and run through the jobs, so it batches with the HTTP requests. Each utterance
gets ``conversation.item.input_audio_transcription.delta`` events as its tokens come and one
``.completed`` (with ``usage``); the deltas joined are the completed transcript. A transcription that
fails gets ``.failed``; a full queue only delays an utterance. /metrics times each utterance from its commit (a client's, or the moment
server VAD heard the silence that ended it) to its first delta and to its completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from steermoe_core.inference.plan import TASK_PROMPTS
from steermoe_core.serving.jobs import Outcome, Ticket, refusal_error, streamed
from steermoe_core.serving.protocol import ApiError, internal_error
from steermoe_core.serving.realtime_session import Commit, Session
from steermoe_core.serving.state import ServerState, bearer, check_key, ready

log = logging.getLogger("steermoe.serve")
router = APIRouter()

KEY_PROTOCOL = "openai-insecure-api-key."
QUEUE_RETRY_S = 0.2  # how often a live utterance retries a full queue


def _protocols(ws: WebSocket) -> list[str]:
    return [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]


def _refusal(ws: WebSocket, state: ServerState) -> ApiError | None:
    """Why the connection is refused (the same checks, codes and messages as the HTTP routes), or None."""
    token = bearer(ws.headers.get("authorization", ""))
    token = token or next((p[len(KEY_PROTOCOL):] for p in _protocols(ws) if p.startswith(KEY_PROTOCOL)), "")
    intent = ws.query_params.get("intent")
    try:
        check_key(state.settings.api_key, token,
                  f"send the header 'Authorization: Bearer KEY' (or, from a browser, the subprotocol '{KEY_PROTOCOL}KEY')")
        if intent not in (None, "transcription"):
            raise ApiError(400, f"intent '{intent}' is not supported: this server runs transcription sessions "
                                "(connect to /v1/realtime?intent=transcription)", code="unsupported_intent")
        ready(state)
    except ApiError as e:
        return e
    return None


async def _deny(ws: WebSocket, e: ApiError) -> None:
    """Refuse the handshake with an HTTP answer in OpenAI's error shape (a close code where the server
    cannot send one)."""
    try:
        await ws.send_denial_response(JSONResponse(e.body(), e.status, headers=e.headers))
    except RuntimeError:
        await ws.close(code=1008, reason=e.message[:120])


def _usage(out: Outcome) -> dict:
    prompt = out.text_tokens + out.audio_tokens
    return {"type": "tokens", "input_tokens": prompt, "output_tokens": out.output_tokens,
            "total_tokens": prompt + out.output_tokens,
            "input_token_details": {"text_tokens": out.text_tokens, "audio_tokens": out.audio_tokens}}


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket):
    state: ServerState = ws.app.state.steermoe
    refused = _refusal(ws, state)
    if refused is not None:
        return await _deny(ws, refused)
    offered = _protocols(ws)
    chosen = "realtime" if "realtime" in offered else next((p for p in offered if not p.startswith(KEY_PROTOCOL)), None)
    await ws.accept(subprotocol=chosen or (offered[0] if offered else None))
    await _Connection(ws, state).run()


class _Connection:
    """One live session: its events in, its writer task out, one task per committed utterance."""

    def __init__(self, ws: WebSocket, state: ServerState):
        self.ws, self.state = ws, state
        settings = state.settings
        max_buffer_s = settings.max_upload_mb * 2**20 / (16_000 * 2)  # the upload cap, as PCM16 at 16 kHz
        self.session = Session(settings.model_name, state.model_ids, state.sm.policy.vad, max_buffer_s)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.tickets: dict[str, Ticket] = {}  # item id -> its transcription in flight
        self.running: set[asyncio.Task] = set()

    async def run(self) -> None:
        metrics = self.state.metrics
        writer = asyncio.ensure_future(self._write())
        metrics.realtime_sessions += 1
        self.outbox.put_nowait(self.session.created())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                events, commits = self.session.handle(text if text is not None else message.get("bytes") or b"")
                for ev in events:
                    self.outbox.put_nowait(ev)
                t0 = time.monotonic()
                for c in commits:
                    metrics.realtime_utterances += 1
                    task = asyncio.ensure_future(self._guarded(c, t0))
                    self.running.add(task)
                    task.add_done_callback(self.running.discard)
        except WebSocketDisconnect:
            pass
        finally:
            metrics.realtime_sessions -= 1
            for ticket in list(self.tickets.values()):
                ticket.cancel()
            for task in list(self.running):
                task.cancel()
            self.outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 1.0)
            writer.cancel()

    async def _write(self) -> None:
        """The one writer: events go out whole and in order."""
        while (ev := await self.outbox.get()) is not None:
            await self.ws.send_text(json.dumps(ev, ensure_ascii=False))

    async def _guarded(self, c: Commit, t0: float) -> None:
        try:
            await self._transcribe(c, t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.error("a live utterance (%s) failed:\n%s", c.item_id, traceback.format_exc())
            self.outbox.put_nowait(_failed(self.session, c, internal_error()))

    async def _start(self, c: Commit) -> Ticket | None:
        """The utterance planned as a transcript and queued; a full queue holds a live utterance back (its
        audio cannot be sent again), never drops it. None (and a ``.failed`` event) when it cannot run."""
        sm, settings = self.state.sm, self.state.settings
        audio = await asyncio.to_thread(lambda: c.utterance.audio)  # 24 -> 16 kHz as an upload is read (ffmpeg)
        plan = sm.plan([audio], c.item_id, TASK_PROMPTS["transcribe"], transcribe=True, max_new_tokens=settings.max_new_tokens)
        del audio
        while True:
            try:
                return self.state.jobs.start(plan, 0.0, True, settings.max_new_tokens or sm.policy.answer_tokens)
            except ApiError as e:
                if e.code != "queue_full":
                    log.warning("a live utterance (%s) failed: %s", c.item_id, e.message)
                    self.outbox.put_nowait(_failed(self.session, c, e))
                    return None
                await asyncio.sleep(QUEUE_RETRY_S)

    async def _transcribe(self, c: Commit, t0: float) -> None:
        """``.delta`` events as the tokens come, then one ``.completed`` (or ``.failed``)."""
        ticket = await self._start(c)
        if ticket is None:
            return
        self.tickets[c.item_id] = ticket
        metrics, first = self.state.metrics, True

        def emit(text: str) -> None:
            nonlocal first
            if first:
                metrics.observe_realtime_first(time.monotonic() - t0)
                first = False
            self.outbox.put_nowait(self.session.event("conversation.item.input_audio_transcription.delta",
                                                      item_id=c.item_id, content_index=0, delta=text))

        try:
            async for text in streamed(ticket):
                emit(text)
            self._finish(c, ticket.done.result(), t0)
        finally:
            self.tickets.pop(c.item_id, None)

    def _finish(self, c: Commit, out: Outcome, t0: float) -> None:
        if out.error is not None or out.refusal is not None:
            log.error("a live utterance (%s) failed: %s", c.item_id, out.refusal.message if out.refusal else out.error)
            e = refusal_error(out.refusal) if out.refusal else internal_error()
            self.outbox.put_nowait(_failed(self.session, c, e))
            return
        self.state.metrics.observe_realtime_completed(time.monotonic() - t0)
        self.outbox.put_nowait(self.session.event("conversation.item.input_audio_transcription.completed", item_id=c.item_id,
                                                  content_index=0, transcript=out.result.text, usage=_usage(out)))


def _failed(session: Session, c: Commit, e: ApiError) -> dict:
    return session.event("conversation.item.input_audio_transcription.failed", item_id=c.item_id, content_index=0,
                         error={"type": e.type, "code": e.code, "message": e.message, "param": None})
