"""The FastAPI app of `steermoe serve`: OpenAI's shapes over one loaded model (DESIGN.md section 13).

    POST /v1/audio/transcriptions   multipart file -> json | text | srt | vtt | verbose_json, or SSE
    POST /v1/chat/completions       messages with text and input_audio parts -> chat.completion(.chunk)
    GET  /v1/models, /health, /metrics, /  (the page, package data)

Audio is decoded and windowed exactly as `steermoe infer` does it (``audio.load_audio``,
``audio.split_points``, the same prompts), rendered by ``inference.formats``, and decoded by the
batcher's worker thread so the event loop keeps answering while the model runs. Every error is
OpenAI's ``{"error": {"message", "type", "code"}}``; an unexpected one is a 500 whose traceback
goes to the server log only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steermoe_core.audio import SAMPLE_RATE, AudioError, load_audio
from steermoe_core.errors import SteermoeError
from steermoe_core.inference.api import TASK_PROMPTS, Result, Segment
from steermoe_core.inference.formats import to_srt, to_vtt, verbose_json
from steermoe_core.inference.longform import STRATEGIES, answer_over_transcript, choose_strategy, plan_segments
from steermoe_core.generation.chat import chat_ids, count_chat_tokens
from steermoe_core.serving.batcher import Batcher, Job, QueueFull, Row
from steermoe_core.serving.metrics import Metrics

log = logging.getLogger("steermoe.serve")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "webm", "m4a", "mp4", "opus", "aac")


@dataclass
class ServeSettings:
    """What `steermoe serve`'s options set (see its --help for each)."""

    model: Path | None = None  # None: what `steermoe infer` would use
    checkpoint: Path | None = None  # what the user named, when ``model`` is its cached export (its folder name is a model id too)
    backend: str = "torch"
    device: str = "auto"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_upload_mb: float = 25.0
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_new_tokens: int | None = None  # per transcribed segment (None: from its length, as `infer`); a chat's default max_tokens
    model_name: str = "steermoe"


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.code, self.headers)


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status, headers=headers)


class _Departed(Exception):
    """The client of a transcript-strategy request went away: its remaining LLM calls are dropped."""


class _State:
    """The loaded model and its batcher; None until loading finishes."""

    def __init__(self) -> None:
        self.sm = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self.model_ids: set[str] = set()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """Upload bytes -> 16 kHz mono float32, through the same loader `infer` uses; the message names
    the upload (not the temp file) and what is wrong with it."""
    if not data:
        raise ApiError(400, f"{name}: empty file", code="invalid_audio")
    suffix = Path(name).suffix if Path(name).suffix.lower().lstrip(".") in AUDIO_FORMATS else ".audio"
    fd, tmp = tempfile.mkstemp(prefix="steermoe-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio(tmp)
    except AudioError as e:
        raise ApiError(400, str(e).replace(tmp, name), code="invalid_audio") from None
    finally:
        os.unlink(tmp)


class _Counting:
    """ASGI middleware: every answer counted by endpoint and status for /metrics (a pure ASGI
    wrapper, so streaming and disconnect detection are untouched)."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests[(path, str(status["code"]))] += 1


def create_app(settings: ServeSettings, on_load_failed=None, loaded=None) -> FastAPI:
    """The app; the model loads on a thread at start-up (``/health`` is 503 until then).
    ``loaded``: an already loaded ``SteerMoE`` (tests, notebooks). ``on_load_failed(message)``:
    called when loading fails (the CLI then stops the server)."""
    from contextlib import asynccontextmanager

    metrics = Metrics()
    state = _State()
    running: set[asyncio.Task] = set()  # the transcript strategy's pipelines (held so they are not collected)
    cap = int(settings.max_upload_mb * 1024 * 1024)

    def load() -> None:
        try:
            sm = loaded
            if sm is None:
                from steermoe_core.inference import SteerMoE

                sm = SteerMoE.load(settings.model, settings.device, backend=settings.backend)
            state.batcher = Batcher(sm.backend, metrics, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
            state.sm = sm
            metrics.loaded = True
            log.info("model loaded: requests are served")
        except SteermoeError as e:
            state.error = str(e)
            log.error("cannot load the model: %s", e)
            if on_load_failed:
                on_load_failed(str(e))
        except Exception:
            state.error = "the model failed to load (traceback in the server log)"
            log.error("cannot load the model:\n%s", traceback.format_exc())
            if on_load_failed:
                on_load_failed(state.error)

    @asynccontextmanager
    async def lifespan(app):
        for named in (settings.model, settings.checkpoint):
            if named is not None:
                state.model_ids.add(Path(named).name)
        state.model_ids.add(settings.model_name)
        loader = threading.Thread(target=load, name="steermoe-load", daemon=True)
        loader.start()
        yield
        if state.batcher is not None:  # uvicorn has already waited for the requests in flight
            await asyncio.to_thread(state.batcher.close, 60)

    app = FastAPI(title="steermoe", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    paths = {"/", "/health", "/metrics", "/v1/models", "/v1/audio/transcriptions", "/v1/chat/completions"}
    app.add_middleware(_Counting, metrics=metrics, paths=paths)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.error("unexpected failure on %s:\n%s", request.url.path, traceback.format_exc())
        return error_response(500, "internal error: the server log has the traceback", "server_error", "internal_error")

    # -- shared checks --
    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        token = header[7:] if header.lower().startswith("bearer ") else header
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def ready() -> Batcher:
        if state.batcher is None:
            raise ApiError(503, state.error or "the model is still loading; try again shortly", "server_error",
                           "model_not_ready", headers={"Retry-After": "2"})
        return state.batcher

    def check_model(model: str | None) -> None:
        if model and model not in state.model_ids:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves {sorted(state.model_ids)}",
                           code="model_not_found")

    def check_length(request: Request, limit: int) -> None:
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limit:
            raise ApiError(413, f"request body of {int(n) / 2**20:.1f} MB is over this server's {settings.max_upload_mb:g} MB "
                                "upload cap (--max-upload-mb)", code="file_too_large")

    def over_cap(name: str, n: int) -> None:
        if n > cap:
            raise ApiError(413, f"{name}: {n / 2**20:.1f} MB is over this server's {settings.max_upload_mb:g} MB upload cap "
                                "(--max-upload-mb)", code="file_too_large")

    def transcript_rows(audio: np.ndarray, budget: int | None) -> tuple[list[Row], list[tuple[int, int]]]:
        """One row per segment, cut as `infer` cuts them (``longform.plan_segments``), each with its
        own token budget (``budget``, else its duration's), and the segments' sample spans."""
        policy = state.sm.policy
        spans = plan_segments(audio, policy).spans
        rows = [Row(clips=[audio[s:e]], prompt=TASK_PROMPTS["transcribe"], budget=budget or policy.budget((e - s) / SAMPLE_RATE))
                for s, e in spans]
        return rows, spans

    def plan_instruction(clips: list[np.ndarray], name: str, prompt: str, requested: str) -> tuple[list, str]:
        """The segments (clip, start, end) an instruction is about and the strategy that runs, chosen
        as `infer` chooses it (``longform.choose_strategy``): ``direct`` puts every segment and the
        prompt in one LLM prompt, refused when that is over the context; ``transcript`` transcribes,
        then the frozen LLM answers over the text (map-reduce past its context)."""
        sm = state.sm
        backend = sm.backend
        windows = [(clip, s, e) for clip in clips for s, e in plan_segments(clip, sm.policy).spans]
        if not windows:
            raise ApiError(400, f"{name}: no speech found, nothing to answer about", code="no_speech")
        need = backend.prompt_tokens(prompt) + sum(backend.audio_token_counts([e - s for _, s, e in windows]))
        if requested == "transcript" and not sm.can_chat:
            raise ApiError(400, f"strategy 'transcript' needs a backend that runs the LLM on text alone (this server runs {backend.name}); "
                                "use strategy 'direct' or 'auto'", code="unsupported_strategy")
        strategy = choose_strategy(requested, sm.policy, need <= backend.max_context, sm.can_chat)
        if strategy == "direct" and need > backend.max_context:
            hint = "use strategy 'transcript' (or 'auto'), or send a shorter recording" if sm.can_chat else \
                "transcribe it (/v1/audio/transcriptions without a prompt), or send a shorter recording"
            raise ApiError(400, f"{name}: too long for the LLM's context ({need} tokens > {backend.max_context}); {hint}",
                           code="context_length_exceeded")
        return windows, strategy

    async def submit_instruction(request: Request, clips: list[np.ndarray], name: str, prompt: str, requested: str,
                                 temperature: float, answer_tokens: int, stream: bool):
        """Queue an instruction about audio by the strategy `infer` would run; returns (job, done
        future, delta queue or None). The job's ``texts[0]`` is the answer; an empty one is an error."""
        windows, strategy = plan_instruction(clips, name, prompt, requested)
        audio_s = sum(len(c) for c in clips) / SAMPLE_RATE
        if strategy == "direct":
            job = Job("audio", [Row(clips=[clip[s:e] for clip, s, e in windows], prompt=prompt, budget=answer_tokens)],
                      temperature, audio_s=audio_s, strategy="direct")
            done, deltas = await submit(request, job, stream)
            return job, done, deltas
        return await submit_transcript(request, windows, name, prompt, temperature, answer_tokens, audio_s, stream)

    async def submit_transcript(request: Request, windows: list, name: str, instruction: str, temperature: float,
                                answer_tokens: int, audio_s: float, stream: bool):
        """The transcript strategy as `infer` runs it: every segment transcribed (greedy, each at its
        duration's budget), then ``longform.answer_over_transcript`` over the texts, its LLM calls
        queued as text-only jobs (so they batch with other chats). Only the final answer streams."""
        policy, backend, batcher = state.sm.policy, state.sm.backend, ready()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        deltas: asyncio.Queue | None = asyncio.Queue() if stream else None
        job = Job("audio", [Row()], temperature, audio_s=audio_s, strategy="transcript")
        job.texts, job.tokens, job.flags, job.stopped = [""], [0], [None], [False]
        seg_rows = [Row(clips=[clip[s:e]], prompt=TASK_PROMPTS["transcribe"], budget=policy.budget((e - s) / SAMPLE_RATE))
                    for clip, s, e in windows]
        seg_job = Job("audio", seg_rows, 0.0, audio_s=audio_s)
        seg_done, _ = await submit(request, seg_job, False)  # a full queue answers 503 here, before any work
        text_tokens = sum(backend.prompt_tokens(r.prompt) for r in seg_rows)
        audio_tokens = sum(backend.audio_token_counts([e - s for _, s, e in windows]))

        def chat(messages: list[dict], n: int, final: bool) -> str:  # on a worker thread
            nonlocal text_tokens
            if job.cancelled.is_set():
                raise _Departed
            ids = chat_ids(backend, messages)
            called = threading.Event()
            one = Job("text", [Row(ids=ids, budget=n)], temperature if final else 0.0, on_done=lambda _: called.set())
            if final and deltas is not None:
                one.on_delta = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
            while True:
                try:
                    batcher.submit(one)
                    break
                except QueueFull:
                    if job.cancelled.is_set():
                        raise _Departed from None
                    time.sleep(0.05)
            while not called.wait(0.2):
                if job.cancelled.is_set():
                    one.cancelled.set()
                if not batcher.thread.is_alive():  # the server is stopping: do not wait forever
                    raise RuntimeError("the model's worker stopped before the answer was written")
            if one.error is not None:
                raise one.error
            if one.cancelled.is_set():
                raise _Departed
            text_tokens += len(ids)
            job.tokens[0] += sum(one.tokens)
            if final:
                job.flags = list(one.flags)
            return one.texts[0]

        async def run() -> None:
            try:
                while not seg_done.done():
                    await asyncio.wait({seg_done}, timeout=0.2)
                    if job.cancelled.is_set():
                        seg_job.cancelled.set()
                if seg_job.error is not None:
                    job.error = seg_job.error
                    return
                if job.cancelled.is_set():
                    return
                job.tokens[0] = sum(seg_job.tokens)
                job.segments = [Segment(s / SAMPLE_RATE, e / SAMPLE_RATE, t, f)
                                for (_, s, e), t, f in zip(windows, seg_job.texts, seg_job.flags)]
                parts = [t for t in seg_job.texts if t]
                job.transcript = " ".join(parts)
                if not parts:
                    job.fail = ApiError(500, f"{name}: nothing was transcribed, so there is nothing to answer about "
                                             "(strategy transcript)", "server_error", "empty_answer")
                    return
                ans = await asyncio.to_thread(answer_over_transcript, instruction, parts, chat, lambda m: count_chat_tokens(backend, m),
                                              backend.max_context, answer_tokens)
                job.texts[0], job.rounds = ans.text, ans.rounds
            except _Departed:
                pass
            except Exception as e:
                log.error("the transcript strategy failed on %s:\n%s", name, traceback.format_exc())
                job.error = e
            finally:
                job.counted = (text_tokens, audio_tokens)
                if not done.done():
                    done.set_result(job)

        task = asyncio.ensure_future(run())
        running.add(task)
        task.add_done_callback(running.discard)
        return job, done, deltas

    def settle(job: Job) -> None:
        """An instruction whose answer came back empty is an error, never a success (as in `infer`)."""
        if job.strategy and job.error is None and job.fail is None and not job.cancelled.is_set() and not job.texts[0].strip():
            job.fail = ApiError(500, f"the model gave an empty answer (strategy {job.strategy})", "server_error", "empty_answer")

    def prompt_tokens(backend, job: Job) -> tuple[int, int]:
        """(text tokens, audio tokens) the job's prompts hold."""
        if job.counted is not None:
            return job.counted
        if job.kind == "text":
            return sum(len(r.ids) for r in job.rows), 0
        audio = sum(sum(backend.audio_token_counts([len(c) for c in r.clips])) for r in job.rows)
        return sum(backend.prompt_tokens(r.prompt) for r in job.rows), audio

    async def submit(request: Request, job: Job, stream: bool):
        """Queue the job; returns (done future, delta queue or None)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        deltas: asyncio.Queue | None = asyncio.Queue() if stream else None

        def finished(j: Job) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(j))

        if deltas is not None:
            job.on_delta = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
        job.on_done = finished
        try:
            ready().submit(job)
        except QueueFull:
            raise ApiError(503, f"the server is busy ({settings.max_queue} requests waiting); retry shortly",
                           "server_error", "queue_full", headers={"Retry-After": "1"}) from None
        return done, deltas

    async def wait(request: Request, job: Job, done: asyncio.Future) -> Job:
        """The finished job; a client that hangs up first has its work dropped."""
        while not done.done():
            try:
                await asyncio.wait_for(asyncio.shield(done), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise asyncio.CancelledError from None
        if job.error is not None:
            log.error("request on %s failed (traceback above)", request.url.path)
            raise ApiError(500, "internal error: the server log has the traceback", "server_error", "internal_error")
        settle(job)
        if job.fail is not None:
            raise job.fail
        return job

    async def events(job: Job, done: asyncio.Future, deltas: asyncio.Queue, first, delta, last):
        """SSE: ``first()`` events, one ``delta(text)`` event per piece of text, ``last(job)`` events,
        then [DONE]; a client that hangs up has its work dropped."""
        try:
            for ev in first():
                yield _sse(ev)
            getter = None
            while True:
                getter = getter or asyncio.ensure_future(deltas.get())
                finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    yield _sse(delta(getter.result()))
                    getter = None
                    continue
                getter.cancel()
                while not deltas.empty():  # what arrived with the end
                    yield _sse(delta(deltas.get_nowait()))
                break
            settle(job)
            if job.error is not None:
                yield _sse({"error": {"message": "internal error: the server log has the traceback", "type": "server_error",
                                      "param": None, "code": "internal_error"}})
            elif job.fail is not None:
                fail = job.fail
                yield _sse({"error": {"message": getattr(fail, "message", str(fail)), "type": getattr(fail, "type", "server_error"),
                                      "param": None, "code": getattr(fail, "code", None)}})
            else:
                for ev in last(job):
                    yield _sse(ev)
            yield "data: [DONE]\n\n"
        finally:
            if not done.done():
                job.cancelled.set()

    # -- endpoints --
    @app.get("/health")
    async def health():
        if state.batcher is None:
            return JSONResponse({"status": "error" if state.error else "loading", "message": state.error}, 503)
        return {"status": "ok", "model": settings.model_name, "backend": state.sm.backend.name}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "steermoe"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("steermoe_core.serving").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        authorize(request)
        check_length(request, cap + 1024 * 1024)
        batcher = ready()
        form = await request.form(max_part_size=1024 * 1024)
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "no audio: send the recording as the multipart field 'file'", code="missing_file")
            check_model(str(form.get("model") or ""))
            fmt = str(form.get("response_format") or "json")
            if fmt not in FORMATS:
                raise ApiError(400, f"response_format '{fmt}' is not one of {', '.join(FORMATS)}", code="invalid_response_format")
            grains = [str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")]
            if "word" in grains:
                raise ApiError(400, "word timestamps are not available: this model times segments (its 30 s windows); "
                                    "ask for timestamp_granularities[]=segment", code="unsupported_granularity")
            temperature = _number(form.get("temperature"), "temperature", 0.0)
            stream = str(form.get("stream") or "false").lower() in ("true", "1")
            prompt = str(form.get("prompt") or "").strip() or None
            strategy = _strategy(form.get("strategy"))
            name = upload.filename or "upload"
            data = await upload.read(cap + 1)
            over_cap(name, len(data))
        finally:
            await form.close()
        audio = await asyncio.to_thread(decode_upload, data, name)
        del data
        backend = batcher.backend
        if prompt is None:
            rows, windows = transcript_rows(audio, settings.max_new_tokens)
            job = Job("audio", rows, temperature, audio_s=len(audio) / SAMPLE_RATE)
            if not rows:  # silence or noise: no speech, an empty transcript (as `infer` gives)
                job.texts, job.tokens, job.flags = [], [], []
            done, deltas = await submit(request, job, stream)
        else:  # an instruction: answered by the strategy `infer` would run
            answer_tokens = settings.max_new_tokens or state.sm.policy.answer_tokens
            job, done, deltas = await submit_instruction(request, [audio], name, prompt, strategy, temperature, answer_tokens, stream)
        del audio

        def result(j: Job) -> Result:
            r = Result(name, audio_s=j.audio_s, strategy=j.strategy)
            if j.strategy is None:
                r.segments = [Segment(s / SAMPLE_RATE, e / SAMPLE_RATE, t) for (s, e), t in zip(windows, j.texts)]
                r.text = " ".join(t for t in j.texts if t)
                return r
            r.text, r.transcript, r.rounds = j.texts[0], j.transcript, j.rounds
            r.segments = j.segments or [Segment(0.0, j.audio_s, r.text, j.flags[0])]
            return r

        def described(r: Result) -> dict:
            """verbose_json, with how an instruction was answered (an extension: strategy, transcript, rounds)."""
            return {**verbose_json(r), **_how(r.strategy, r.transcript, r.rounds)}

        def usage(j: Job) -> dict:
            text_tokens, audio_tokens = prompt_tokens(backend, j)
            out = sum(j.tokens)
            return {"type": "tokens", "input_tokens": text_tokens + audio_tokens, "output_tokens": out,
                    "total_tokens": text_tokens + audio_tokens + out,
                    "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens}, "seconds": round(j.audio_s, 3)}

        if stream:
            def last(j: Job):
                r = result(j)
                ev = {"type": "transcript.text.done", "text": r.text, "usage": usage(j)}
                if fmt == "verbose_json":  # an extension the page uses: the segments with their times
                    v = described(r)
                    ev.update({k: v[k] for k in ("segments", "strategy", "transcript", "rounds") if k in v})
                return [ev]

            return StreamingResponse(events(job, done, deltas, list, lambda t: {"type": "transcript.text.delta", "delta": t}, last),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        j = await wait(request, job, done)
        r = result(j)
        if fmt == "text":
            return PlainTextResponse(r.text + "\n")
        if fmt == "srt":
            return PlainTextResponse(to_srt(r), media_type="application/x-subrip")
        if fmt == "vtt":
            return PlainTextResponse(to_vtt(r), media_type="text/vtt")
        if fmt == "verbose_json":
            return {**described(r), "usage": usage(j)}
        return {"text": r.text, "usage": usage(j)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        check_length(request, cap * 4 // 3 + 1024 * 1024)  # base64 is 4/3 of the audio
        batcher = ready()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON", code="invalid_json") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ApiError(400, "'messages' must be a non-empty list", code="invalid_messages")
        check_model(str(body.get("model") or ""))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or settings.max_new_tokens or state.sm.policy.answer_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer", code="invalid_max_tokens")
        temperature = _number(body.get("temperature"), "temperature", 0.0)
        stream = bool(body.get("stream"))
        strategy = _strategy(body.get("strategy"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        turns, audios = _read_messages(body["messages"], over_cap)
        backend = batcher.backend
        clips = [await asyncio.to_thread(decode_upload, data, name) for name, data in audios]
        del audios
        if clips:  # an instruction about audio: answered by the strategy `infer` would run
            job, done, deltas = await submit_instruction(request, clips, "the audio", _audio_prompt(turns), strategy,
                                                         temperature, max_tokens, stream)
        else:
            try:
                ids = await asyncio.to_thread(_text_ids, backend, turns)
            except SteermoeError as e:
                raise ApiError(400, str(e), code="unsupported") from None
            job = Job("text", [Row(ids=ids, budget=max_tokens)], temperature)
            done, deltas = await submit(request, job, stream)
        del clips
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage(j: Job) -> dict:
            text_tokens, audio_tokens = prompt_tokens(backend, j)
            out = sum(j.tokens)
            return {"prompt_tokens": text_tokens + audio_tokens, "completion_tokens": out,
                    "total_tokens": text_tokens + audio_tokens + out,
                    "prompt_tokens_details": {"audio_tokens": audio_tokens, "cached_tokens": 0},
                    "audio_seconds": round(j.audio_s, 3)}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if stream:
            def last(j: Job):
                evs = [{**chunk({}, j.finish_reason), **_how(j.strategy, j.transcript, j.rounds)}]
                if include_usage:
                    evs.append({**chunk({}), "choices": [], "usage": usage(j)})
                return evs

            return StreamingResponse(events(job, done, deltas, lambda: [chunk({"role": "assistant", "content": ""})],
                                            lambda t: chunk({"content": t}), last),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        j = await wait(request, job, done)
        return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": j.texts[0]}, "finish_reason": j.finish_reason}],
                "usage": usage(j), **_how(j.strategy, j.transcript, j.rounds)}

    app.state.steermoe = state
    app.state.metrics = metrics
    return app


def _number(value, name: str, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a number, not {str(value)[:40]!r}", code=f"invalid_{name}") from None
    if not 0 <= x <= 2:
        raise ApiError(400, f"{name} must be between 0 and 2", code=f"invalid_{name}")
    return x


def _how(strategy: str | None, transcript: str | None, rounds: int) -> dict:
    """An extension to OpenAI's shapes: how an answer about audio was made (the strategy; for the
    transcript strategy, the transcript and the map-reduce rounds); nothing for a plain transcript."""
    if strategy is None:
        return {}
    return {"strategy": strategy, **({"transcript": transcript, "rounds": rounds} if strategy == "transcript" else {})}


def _strategy(value) -> str:
    """An instruction's strategy (form field or request field): auto (default) | direct | transcript."""
    chosen = str(value or "auto").strip().lower()
    if chosen not in STRATEGIES:
        raise ApiError(400, f"strategy '{str(value)[:40]}' is not one of {', '.join(STRATEGIES)}", code="invalid_strategy")
    return chosen


def _read_messages(messages: list, over_cap) -> tuple[list[dict], list[tuple[str, bytes]]]:
    """OpenAI messages -> turns with their text ({"role", "content": str}) and the audio parts' bytes,
    in order (named "message N audio M" in errors)."""
    turns, audios = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", code="invalid_messages")
        content = m.get("content")
        texts = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "input_audio":
                    audio = part.get("input_audio") or {}
                    fmt = str(audio.get("format") or "wav").lower()
                    name = f"messages[{i}].content[{k}] ({fmt})"
                    if fmt not in AUDIO_FORMATS:
                        raise ApiError(400, f"{name}: audio format '{fmt}' is not one of {', '.join(AUDIO_FORMATS)}",
                                       code="invalid_audio_format")
                    try:
                        data = base64.b64decode(str(audio.get("data") or ""), validate=True)
                    except (binascii.Error, ValueError):
                        raise ApiError(400, f"{name}: input_audio.data is not base64", code="invalid_audio") from None
                    over_cap(name, len(data))
                    audios.append((f"{name}.{fmt}", data))
                else:
                    raise ApiError(400, f"messages[{i}].content[{k}]: part type '{kind}' is not supported (text, input_audio)",
                                   code="invalid_content")
        elif content is not None:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", code="invalid_messages")
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append({"role": role, "content": "\n".join(t for t in texts if t)})
    return turns, audios


def _audio_prompt(turns: list[dict]) -> str:
    """The instruction written after the audio: the last user turn's text (the transcription prompt
    when it has none), after the system prompt and earlier turns as context. The audio of every turn
    comes first, in order, as the model was trained: audio, then the instruction."""
    last = next((i for i in range(len(turns) - 1, -1, -1) if turns[i]["role"] == "user"), len(turns) - 1)
    ask = turns[last]["content"].strip() or TASK_PROMPTS["transcribe"]
    before = [t for t in turns[:last] if t["content"].strip()]
    if not before:
        return ask
    context = "\n".join(f"{t['role']}: {t['content'].strip()}" for t in before)
    return f"{context}\nuser: {ask}"


def _text_ids(backend, turns: list[dict]) -> list[int]:
    return chat_ids(backend, [t for t in turns if t["content"] or t["role"] != "system"])
