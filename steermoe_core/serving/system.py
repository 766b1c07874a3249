"""The routes around the model: ``GET /health`` (503 until the model is loaded), ``/metrics``
(Prometheus text), ``/v1/models`` (the served model names) and ``/`` (the page, package data)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from steermoe_core.serving.state import authorize, state_of

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = state_of(request)
    if state.jobs is None:
        return JSONResponse({"status": "error" if state.error else "loading", "message": state.error}, 503)
    return {"status": "ok", "model": state.settings.model_name, "backend": state.sm.backend.name}


@router.get("/metrics")
async def metrics(request: Request):
    return PlainTextResponse(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    names = authorize(request).settings.served_model_names
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "steermoe"} for n in names]}


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(resources.files("steermoe_core.serving").joinpath("static/index.html").read_text(encoding="utf-8"))
