"""Function calling on `/v1/chat/completions`: the request's tools offered to the frozen LLM, its
answer parsed into OpenAI's ``tool_calls`` and streamed as vLLM's hermes parser streams them.

The rendering, parsing and grammar live in ``generation.tools``; this module turns them into the
chat route's rows (``tool_row``) and answers (``message``, ``ToolStream``).
"""

from __future__ import annotations

import json
import re

from steermoe_core.errors import SteermoeError
from steermoe_core.generation.tools import CLOSE, OPEN, ToolCall, parse_tool_calls, tool_prompt
from steermoe_core.serving.batcher import Row
from steermoe_core.serving.protocol import ApiError, ChatCompletionRequest, NamedToolChoice

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def tool_row(backend, body: ChatCompletionRequest, turns: list[dict], budget: int) -> Row:
    """The text-only row of a chat that offers tools: rendered with them, and under the call grammar
    when the answer must be a call (a named tool, or 'required')."""
    many = body.tool_choice == "required" and body.parallel_tool_calls
    try:
        ids, grammar = tool_prompt(backend.text_tokenizer, turns, body.offered(), body.forced(), many, backend.stop_ids)
    except SteermoeError as e:
        raise ApiError(400, str(e), code="invalid_tools") from None
    return Row(ids=ids, budget=budget, constraint=grammar)


def calls_of(body: ChatCompletionRequest, text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of an answer: calls only to offered tools, one unless parallel calls are allowed."""
    if not body.offered():
        return text, []
    content, calls = parse_tool_calls(text, {t["function"]["name"] for t in body.offered()})
    if calls and not body.parallel_tool_calls:
        calls = calls[:1]
    return content, calls


def finish_reason(body: ChatCompletionRequest, called: bool, reason: str) -> str:
    """'tool_calls' when the answer is calls (auto, required); a named tool's call finishes with 'stop', as OpenAI's does."""
    if not called:
        return reason
    return "stop" if isinstance(body.tool_choice, NamedToolChoice) else "tool_calls"


def message(body: ChatCompletionRequest, text: str) -> tuple[dict, list[ToolCall]]:
    """The assistant message of a finished answer, with its calls in OpenAI's shape."""
    content, calls = calls_of(body, text)
    if not calls:
        return {"role": "assistant", "content": text}, []
    return {"role": "assistant", "content": content or None, "tool_calls": [c.to_openai() for c in calls]}, calls


def _args_end(text: str) -> int | None:
    """Where the JSON value at the start of ``text`` ends (None while it is still open)."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class ToolStream:
    """Text deltas -> chat.completion.chunk deltas: plain text as ``content``; each ``<tool_call>``
    as one delta with its index, id, type and name, then its arguments in fragments. Text that may
    be the start of a tag is held back, so no partial tag is ever sent."""

    def __init__(self, body: ChatCompletionRequest):
        self.body = body
        self.known = {t["function"]["name"] for t in body.offered()}
        self.buf, self.in_call, self.body_text = "", False, ""
        self.calls = 0  # calls opened so far
        self.name_sent, self.args_sent = False, 0

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        out: list[dict] = []
        while True:
            if not self.in_call:
                i = self.buf.find(OPEN)
                if i < 0:
                    keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1) if OPEN.startswith(self.buf[-k:])), 0)
                    out += self._content(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                out += self._content(self.buf[:i])
                self.buf, self.in_call, self.body_text = self.buf[i + len(OPEN):], True, ""
                self.name_sent, self.args_sent = False, 0
            j = self.buf.find(CLOSE)
            if j < 0:
                keep = next((k for k in range(min(len(CLOSE) - 1, len(self.buf)), 0, -1) if CLOSE.startswith(self.buf[-k:])), 0)
                self.body_text += self.buf[: len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return out + self._call_progress()
            self.body_text += self.buf[:j]
            self.buf, self.in_call = self.buf[j + len(CLOSE):], False
            out += self._call_progress()
            if not self.name_sent:  # not a call after all: what was held back is text
                out += self._content(f"{OPEN}{self.body_text}{CLOSE}")
            else:
                self.calls += 1

    def finish(self) -> list[dict]:
        """What is still held back at the end of the answer (a call its budget cut before the closing
        tag still counts when its name was sent: its arguments are whole, as parsing finds them)."""
        if self.in_call and not self.name_sent:
            return self._content(f"{OPEN}{self.body_text}{self.buf}")
        if self.in_call:
            self.calls += 1
            return []
        return self._content(self.buf)

    def _content(self, text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def _call_progress(self) -> list[dict]:
        out = []
        if not self.name_sent:
            m, a = _NAME.search(self.body_text), _ARGS.search(self.body_text)
            if not (m and a) or json.loads(f'"{m.group(1)}"') not in self.known:
                return out
            call = ToolCall(json.loads(f'"{m.group(1)}"'), "")
            out.append({"tool_calls": [{"index": self.calls, "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
            self.name_sent = True
        a = _ARGS.search(self.body_text)
        args = self.body_text[a.end():]
        end = _args_end(args)
        upto = end if end is not None else len(args)
        if upto > self.args_sent:
            out.append({"tool_calls": [{"index": self.calls, "function": {"arguments": args[self.args_sent:upto]}}]})
            self.args_sent = upto
        return out
