"""The OpenAI wire format `steermoe serve` speaks: request models (validated by pydantic, so a bad
field is a 400 naming it) and OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.

Fields OpenAI defines that this server does not act on (``top_p``, ``n``, ``stop``, ``language``,
``seed``, ...) are accepted and ignored, so code written for OpenAI runs unchanged; docs/serve.md
lists which are honoured. ``strategy`` is steermoe's extension: how an instruction about audio runs.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steermoe_core.inference.longform import STRATEGIES

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
Strategy = Literal[STRATEGIES]  # type: ignore[valid-type]


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def internal_error() -> ApiError:
    """What a client sees of an unexpected failure (the traceback goes to the server log only)."""
    return ApiError(500, "internal error: the server log has the traceback", "server_error", "internal_error")


def invalid(e: ValidationError, prefix: str = "") -> ApiError:
    """A pydantic validation error as a 400 naming the first bad field: code ``invalid_<field>``."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    field = loc[0] if loc else "body"
    where = ".".join(loc) or "the request body"
    if err.get("type") == "json_invalid":
        return ApiError(400, "the request body is not JSON", code="invalid_json")
    message = str(err.get("msg", "is not valid")).removeprefix("Value error, ")
    return ApiError(400, f"{prefix}{where}: {message}", code=f"invalid_{field}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's other fields: accepted, ignored


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = ""


class InputAudio(BaseModel):
    data: str = ""
    format: str = "wav"


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | AudioPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    strategy: Strategy = "auto"

    def budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class TranscriptionRequest(_Request):
    """The multipart form's fields (the file is read apart, with its size cap)."""

    model: str | None = None
    prompt: str | None = None
    response_format: Literal[FORMATS] = "json"  # type: ignore[valid-type]
    temperature: float = Field(0.0, ge=0, le=2)
    stream: bool = False
    strategy: Strategy = "auto"
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=list)
