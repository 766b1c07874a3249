"""`steermoe serve`: the model behind an OpenAI-compatible HTTP API and a web page."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import BackendName, console, friendly, pick_backend


@friendly
def serve(
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint, or a folder from `steermoe export --onnx` (default: what `infer` uses)")] = None,
    backend: Annotated[BackendName, typer.Option(envvar="STEERMOE_BACKEND", help="auto (onnxruntime on a CPU, from an export built once and cached; torch on a GPU) | torch | onnxruntime")] = BackendName.auto,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless you say otherwise)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require 'Authorization: Bearer KEY' on /v1 (default: $STEERMOE_API_KEY)")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="Let a web page from this origin call the API (repeatable; '*' for any)")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Larger uploads are answered 413")] = 25.0,
    max_batch: Annotated[int, typer.Option(help="Rows (speech segments or chats) decoded together")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests while they are arriving")] = 10.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for the model; more are answered 503 with Retry-After")] = 64,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Token budget per transcribed segment (default: from its length, as `infer`), and a chat's default max_tokens")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    served_model_name: Annotated[Optional[list[str]], typer.Option(help="A model name requests may use, e.g. whisper-1 for code written for OpenAI (repeatable: all are accepted and listed by /v1/models, the first is the one responses report; default: steermoe)")] = None,
):
    """Serve a trained model: /v1/audio/transcriptions and /v1/chat/completions in OpenAI's shapes,
    /v1/models, /health, /metrics, and a page at / to upload or record audio.

    Concurrent requests are batched onto the one model. Ctrl-C or SIGTERM finishes the requests in
    flight, then exits 0."""
    from steermoe_core.errors import MissingDependency, UsageError

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError:
        raise MissingDependency("steermoe serve needs FastAPI, uvicorn and python-multipart: pip install 'steermoe[serve]'") from None
    import logging
    import signal

    from steermoe_core.inference import default_model_path
    from steermoe_core.serving.app import ServeSettings, create_app

    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-new-tokens", max_new_tokens or 1)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if max_upload_mb <= 0 or max_wait_ms < 0 or not 0 < port < 65536:
        raise UsageError("--max-upload-mb must be > 0, --max-wait-ms >= 0 and --port in 1..65535")
    names = list(dict.fromkeys(served_model_name or ["steermoe"]))  # the first stays first; a repeat is dropped
    if not all(name.strip() for name in names):
        raise UsageError("--served-model-name needs a non-empty name")
    model = model or default_model_path()
    if not Path(model).exists():
        raise UsageError(f"{model}: no such checkpoint or exported folder")
    shown_model = model
    model, backend_name = pick_backend(Path(model), backend, device, 1)
    settings = ServeSettings(
        model=Path(model), checkpoint=Path(shown_model), backend=backend_name, device=device, api_key=api_key or os.environ.get("STEERMOE_API_KEY") or None,
        cors_origins=list(cors_origin or []), max_upload_mb=max_upload_mb, max_batch=max_batch, max_wait_ms=max_wait_ms,
        max_queue=max_queue, max_new_tokens=max_new_tokens, served_model_names=names,
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def load_failed(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failed=load_failed)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None, lifespan="on")
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"steermoe serve: {shown_model} ({backend_name}) at [bold]http://{shown}:{port}/[/] "
                  f"(OpenAI base_url http://{shown}:{port}/v1{', API key required' if settings.api_key else ''}); "
                  "Ctrl-C to stop", soft_wrap=True, highlight=False)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with these
    # handlers in place that re-raise is a no-op, so a SIGTERM or Ctrl-C ends with exit code 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failed:
        raise UsageError(f"cannot serve {shown_model}: {failed[0]}")
    if not server.started:
        raise typer.Exit(2)
    console.print("steermoe serve: stopped")
