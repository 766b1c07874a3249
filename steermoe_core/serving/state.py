"""What every route shares: the server's settings, the loaded model and its jobs, and the checks a
request passes before any work (API key, model name, body size, model loaded)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from steermoe_core.serving.batcher import Batcher
from steermoe_core.serving.jobs import Jobs
from steermoe_core.serving.metrics import Metrics
from steermoe_core.serving.protocol import ApiError


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
    served_model_names: list[str] = field(default_factory=lambda: ["steermoe"])  # /v1/models lists them; the first is reported

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


@dataclass
class ServerState:
    """The settings and, once loading has finished, the model and its jobs."""

    settings: ServeSettings
    metrics: Metrics = field(default_factory=Metrics)
    sm: object | None = None  # inference.SteerMoE
    batcher: Batcher | None = None
    jobs: Jobs | None = None
    error: str | None = None
    model_ids: set[str] = field(default_factory=set)  # every name a request may use


def state_of(request: Request) -> ServerState:
    return request.app.state.steermoe


def bearer(header: str) -> str:
    """The token of an ``Authorization`` header (``Bearer KEY``, or the bare key)."""
    return header[7:] if header.lower().startswith("bearer ") else header


def check_key(key: str | None, token: str, how: str = "send the header 'Authorization: Bearer KEY'") -> None:
    """401 unless ``token`` is the server's API key (any token when it has none)."""
    if not key:
        return
    if not token:
        raise ApiError(401, f"missing API key: {how}", code="invalid_api_key")
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "incorrect API key", code="invalid_api_key")


def authorize(request: Request) -> ServerState:
    """The server's state, once the request's API key is right (when the server has one)."""
    state = state_of(request)
    check_key(state.settings.api_key, bearer(request.headers.get("authorization", "")))
    return state


def ready(state: ServerState) -> Jobs:
    """The model's jobs; 503 with Retry-After while the model loads (or the error that stopped it)."""
    if state.jobs is None:
        raise ApiError(503, state.error or "the model is still loading; try again shortly", "server_error",
                       "model_not_ready", headers={"Retry-After": "2"})
    return state.jobs


def check_model(state: ServerState, model: str | None) -> None:
    if model and model not in state.model_ids:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves {sorted(state.model_ids)}",
                       code="model_not_found")


def check_length(request: Request, limit: int) -> None:
    """A body announced as larger than ``limit`` bytes is refused before it is read."""
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        mb = state_of(request).settings.max_upload_mb
        raise ApiError(413, f"request body of {int(n) / 2**20:.1f} MB is over this server's {mb:g} MB upload cap "
                            "(--max-upload-mb)", code="file_too_large")
