"""The FastAPI app of `steermoe serve`: it loads the model, mounts the routes and answers every error
in OpenAI's shape; the routes live one family per module, as vLLM's OpenAI server lays them out.

    transcriptions.py   POST /v1/audio/transcriptions
    chat.py             POST /v1/chat/completions
    realtime.py         WS /v1/realtime?intent=transcription (live; the session logic: realtime_session.py)
    system.py           GET /health, /metrics, /v1/models, / (the page)
    protocol.py         request models and the error shape;   uploads.py  audio in requests
    state.py            settings, the loaded model, the checks every route makes first
    jobs.py             planned requests on the batcher, as futures;   batcher.py  the batches

An unexpected error is a 500 whose traceback goes to the server log only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from steermoe_core.errors import SteermoeError
from steermoe_core.serving import chat, realtime, system, transcriptions
from steermoe_core.serving.batcher import Batcher
from steermoe_core.serving.jobs import Jobs
from steermoe_core.serving.metrics import Metrics
from steermoe_core.serving.protocol import ApiError, internal_error
from steermoe_core.serving.state import ServerState, ServeSettings

log = logging.getLogger("steermoe.serve")

ROUTERS = (transcriptions.router, chat.router, realtime.router, system.router)

__all__ = ["ServeSettings", "create_app"]


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


def _load(state: ServerState, loaded, on_load_failed) -> None:
    """Load the model (on a thread, so /health answers 503 meanwhile), then open the jobs."""
    settings = state.settings
    try:
        sm = loaded
        if sm is None:
            from steermoe_core.inference import SteerMoE

            sm = SteerMoE.load(settings.model, settings.device, backend=settings.backend)
        batcher = Batcher(sm.backend, state.metrics, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
        state.sm, state.batcher = sm, batcher
        state.jobs = Jobs(batcher, settings.max_queue)
        state.metrics.loaded = True
        log.info("model loaded: requests are served")
        return
    except SteermoeError as e:
        state.error = str(e)
        log.error("cannot load the model: %s", e)
    except Exception:
        state.error = "the model failed to load (traceback in the server log)"
        log.error("cannot load the model:\n%s", traceback.format_exc())
    if on_load_failed:
        on_load_failed(state.error)


def create_app(settings: ServeSettings, on_load_failed=None, loaded=None) -> FastAPI:
    """The app; the model loads on a thread at start-up (``/health`` is 503 until then).
    ``loaded``: an already loaded ``SteerMoE`` (tests, notebooks). ``on_load_failed(message)``:
    called when loading fails (the CLI then stops the server)."""
    state = ServerState(settings)
    state.model_ids.update(settings.served_model_names)
    state.model_ids.update(Path(p).name for p in (settings.model, settings.checkpoint) if p is not None)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=_load, args=(state, loaded, on_load_failed), name="steermoe-load", daemon=True).start()
        yield
        if state.batcher is not None:  # uvicorn has already waited for the requests in flight
            await asyncio.to_thread(state.batcher.close, 60)

    app = FastAPI(title="steermoe", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    for router in ROUTERS:
        app.include_router(router)
    paths = {route.path for router in ROUTERS for route in router.routes}
    app.add_middleware(_Counting, metrics=state.metrics, paths=paths)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return ApiError(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.error("unexpected failure on %s:\n%s", request.url.path, traceback.format_exc())
        return internal_error().response()

    app.state.steermoe = state
    app.state.metrics = state.metrics
    return app
