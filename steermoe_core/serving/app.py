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
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steermoe_core.audio import SAMPLE_RATE, AudioError, load_audio
from steermoe_core.errors import SteermoeError
from steermoe_core.inference.api import TASK_PROMPTS, Result, Segment
from steermoe_core.inference.formats import to_srt, to_vtt, verbose_json
from steermoe_core.inference.longform import plan_segments
from steermoe_core.serving.batcher import Batcher, Job, QueueFull, Row
from steermoe_core.serving.metrics import Metrics

log = logging.getLogger("steermoe.serve")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "webm", "m4a", "mp4", "opus", "aac")


@dataclass
class ServeSettings:
    """What `steermoe serve`'s options set (see its --help for each)."""

    model: Path | None = None  # None: what `steermoe infer` would use
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
        if settings.model is not None:
            state.model_ids.add(Path(settings.model).name)
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

    def audio_rows(clips: list[np.ndarray], name: str, prompt: str, transcribe: bool, budget: int | None) -> tuple[list[Row], list]:
        """The rows and the segments (sample spans) they read, cut as `infer` cuts them
        (``longform.plan_segments``): one row per segment when transcribing, each with its own
        token budget, else one row holding every segment (`infer --strategy direct`); a prompt that
        would not fit the LLM's context is refused as `infer` refuses it."""
        backend, policy = state.sm.backend, state.sm.policy
        windows = [(clip, s, e) for clip in clips for s, e in plan_segments(clip, policy).spans]
        if transcribe:
            rows = [Row(clips=[clip[s:e]], prompt=prompt, budget=budget or policy.budget((e - s) / SAMPLE_RATE))
                    for clip, s, e in windows]
            return rows, [(s, e) for _, s, e in windows]
        if not windows:
            raise ApiError(400, f"{name}: no speech found, nothing to answer about", code="no_speech")
        need = backend.prompt_tokens(prompt) + sum(backend.audio_token_counts([e - s for _, s, e in windows]))
        if need > backend.max_context:
            raise ApiError(400, f"{name}: too long for the LLM's context ({need} tokens > {backend.max_context}); "
                                "transcribe it (/v1/audio/transcriptions without a prompt), or send a shorter recording",
                           code="context_length_exceeded")
        rows = [Row(clips=[clip[s:e] for clip, s, e in windows], prompt=prompt, budget=budget or policy.answer_tokens)]
        return rows, [(0, sum(len(c) for c in clips))]

    def prompt_tokens(backend, job: Job) -> tuple[int, int]:
        """(text tokens, audio tokens) the job's prompts hold."""
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
            if job.error is not None:
                yield _sse({"error": {"message": "internal error: the server log has the traceback", "type": "server_error",
                                      "param": None, "code": "internal_error"}})
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
            name = upload.filename or "upload"
            data = await upload.read(cap + 1)
            over_cap(name, len(data))
        finally:
            await form.close()
        audio = await asyncio.to_thread(decode_upload, data, name)
        del data
        backend = batcher.backend
        rows, windows = audio_rows([audio], name, prompt or TASK_PROMPTS["transcribe"], prompt is None, settings.max_new_tokens)
        job = Job("audio", rows, temperature, audio_s=len(audio) / SAMPLE_RATE)
        del audio
        if not rows:  # silence or noise: no speech, an empty transcript (as `infer` gives)
            job.texts, job.tokens, job.flags = [], [], []

        def result(j: Job) -> Result:
            texts = j.texts
            r = Result(name, audio_s=j.audio_s)
            r.segments = [Segment(s / SAMPLE_RATE, e / SAMPLE_RATE, t) for (s, e), t in zip(windows, texts)]
            r.text = " ".join(t for t in texts if t)
            return r

        def usage(j: Job) -> dict:
            text_tokens, audio_tokens = prompt_tokens(backend, j)
            out = sum(j.tokens)
            return {"type": "tokens", "input_tokens": text_tokens + audio_tokens, "output_tokens": out,
                    "total_tokens": text_tokens + audio_tokens + out,
                    "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens}, "seconds": round(j.audio_s, 3)}

        done, deltas = await submit(request, job, stream)
        if stream:
            def last(j: Job):
                r = result(j)
                ev = {"type": "transcript.text.done", "text": r.text, "usage": usage(j)}
                if fmt == "verbose_json":  # an extension the page uses: the segments with their times
                    ev["segments"] = verbose_json(r)["segments"]
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
            return {**verbose_json(r), "usage": usage(j)}
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
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        turns, audios = _read_messages(body["messages"], over_cap)
        backend = batcher.backend
        clips = [await asyncio.to_thread(decode_upload, data, name) for name, data in audios]
        del audios
        if clips:
            rows, _ = audio_rows(clips, "the audio", _audio_prompt(turns), False, max_tokens)
            job = Job("audio", rows, temperature, audio_s=sum(len(c) for c in clips) / SAMPLE_RATE)
        else:
            try:
                ids = await asyncio.to_thread(_text_ids, backend, turns)
            except SteermoeError as e:
                raise ApiError(400, str(e), code="unsupported") from None
            job = Job("text", [Row(ids=ids, budget=max_tokens)], temperature)
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

        done, deltas = await submit(request, job, stream)
        if stream:
            def last(j: Job):
                evs = [chunk({}, j.finish_reason)]
                if include_usage:
                    evs.append({**chunk({}), "choices": [], "usage": usage(j)})
                return evs

            return StreamingResponse(events(job, done, deltas, lambda: [chunk({"role": "assistant", "content": ""})],
                                            lambda t: chunk({"content": t}), last),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        j = await wait(request, job, done)
        return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": j.texts[0]}, "finish_reason": j.finish_reason}],
                "usage": usage(j)}

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
    from steermoe_core.serving import llm

    return llm.chat_prompt_ids(backend, [t for t in turns if t["content"] or t["role"] != "system"])
