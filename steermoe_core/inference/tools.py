"""Spoken function calling for `infer --tools` and the Python API: each recording transcribed by the
request planner, then the frozen LLM asked with the tools offered (``generation.tools``: the LLM's
own template or a Hermes block; a named tool or 'required' decoded under the tool's JSON schema).

    for line in spoken_calls(sm, ["command.wav"], tools, tool_choice="set_timer"):
        print(line)   # {"path", "transcript", "name", "arguments"} per call, or {"path", "transcript", "content"}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from steermoe_core.errors import UsageError
from steermoe_core.generation.tools import functions, tool_answer


def read_tools(path: str | Path) -> list[dict]:
    """OpenAI ``tools`` from a JSON file: a list of ``{"type": "function", "function": {...}}`` (or a
    ``{"tools": [...]}`` object); a bad file is a one-line error naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable JSON file of tools ({e})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not tools:
        raise UsageError(f"{path}: expected a JSON list of tools, e.g. [{{\"type\": \"function\", \"function\": {{...}}}}]")
    try:
        functions(tools)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    return tools


def forced_functions(tools: list[dict], tool_choice: str) -> list[dict] | None:
    """What the answer must call: ``required`` (any tool), a tool's name (that one), or None (auto)."""
    fns = functions(tools)
    if tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        return list(fns.values())
    if tool_choice not in fns:
        raise UsageError(f"--tool-choice {tool_choice!r} is not auto, none, required or one of the tools {sorted(fns)}")
    return [fns[tool_choice]]


def spoken_calls(sm, inputs: Iterable, tools: list[dict], tool_choice: str = "auto", parallel: bool = True,
                 max_new_tokens: int = 256, batch_size: int = 8) -> Iterator[dict]:
    """One record per call (or one with the answer's ``content`` when it made none, or its ``error``), per input."""
    forced = forced_functions(tools, tool_choice)
    offered = [] if tool_choice == "none" else tools
    for r in sm.stream(inputs, transcribe=True, batch_size=batch_size):
        if r.error:
            yield {"path": r.path, "error": r.error}
            continue
        turns = [{"role": "user", "content": r.text}]
        if not offered:
            yield {"path": r.path, "transcript": r.text, "content": sm.chat_text(turns, max_new_tokens)}
            continue
        content, calls, _ = tool_answer(sm.backend, turns, offered, forced, parallel and tool_choice != "none", max_new_tokens)
        if not calls:
            yield {"path": r.path, "transcript": r.text, "content": content}
        for call in calls if parallel else calls[:1]:
            yield {"path": r.path, "transcript": r.text, "name": call.name, "arguments": json.loads(call.arguments)}
