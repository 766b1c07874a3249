"""The OpenAI wire format `steermoe serve` speaks: request models (validated by pydantic, so a bad
field is a 400 naming it) and OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.

Fields OpenAI defines that this server does not act on (``top_p``, ``n``, ``stop``, ``language``,
``seed``, ...) are accepted and ignored, so code written for OpenAI runs unchanged; docs/serve.md
lists which are honoured. ``strategy`` is steermoe's extension: how an instruction about audio runs.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"  # a JSON object, as text


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | AudioPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


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
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, choice, info):
        names = [t.function.name for t in info.data.get("tools") or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names '{choice.function.name}', which is not one of the tools {names}")
        if choice == "required" and not names:
            raise ValueError("'required' needs tools")
        return choice

    def offered(self) -> list[dict]:
        """The tools the model may call (none with tool_choice 'none'), as OpenAI dicts."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced(self) -> list[dict] | None:
        """The functions the answer must call (a named tool, or any with 'required'); None in auto mode."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t.function.model_dump(exclude_none=True) for t in self.tools if t.function.name == self.tool_choice.function.name]
        if self.tool_choice == "required":
            return [t.function.model_dump(exclude_none=True) for t in self.tools]
        return None

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
