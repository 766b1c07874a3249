"""Function calling with the frozen LLM, in OpenAI's shapes and the Hermes format LLMs are trained on.

- **Rendering**: the LLM's own chat template when it knows ``tools`` (Qwen2.5's does), else a
  Hermes-style system block listing the tools and asking for ``<tool_call>{...}</tool_call>``.
  Earlier assistant calls (OpenAI's ``tool_calls`` with JSON-string ``arguments``) are turned back
  into dicts for the template, and ``tool`` messages are rendered as the template renders them.
- **Parsing**: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; a block that is
  not such JSON makes the whole answer plain text, never a broken call.
- **Valid calls from any model**: with a named tool or ``tool_choice="required"`` the answer is
  decoded under a grammar (llguidance, a maintained Rust engine with a numpy bitmask API, so the
  torch and onnxruntime backends share it) that only admits a call whose arguments follow the tool's
  JSON schema.
- **Streaming** (``ToolStream``): as vLLM's hermes parser streams: a call's name first, then its
  arguments in fragments, never a partial ``<tool_call>`` tag.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from steermoe_core.errors import MissingDependency, UsageError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def functions(tools: list[dict]) -> dict[str, dict]:
    """name -> function spec of OpenAI ``tools`` (``{"type": "function", "function": {...}}``)."""
    out = {}
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UsageError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
        out[fn["name"]] = fn
    return out


# -- rendering ----------------------------------------------------------------------------------------
def knows_tools(tokenizer) -> bool:
    """Whether the LLM's chat template renders ``tools`` itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def hermes_system(tools: list[dict]) -> str:
    """The Hermes function-calling system prompt (NousResearch's format, which Qwen2.5 follows too)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You are a function calling AI model. You may call one or more functions to assist with the user query. "
            f"Here are the available tools:\n<tools>\n{listed}\n</tools>\n\nFor each function call, return a JSON object "
            f'with the function name and arguments within {OPEN}{CLOSE} XML tags:\n{OPEN}\n{{"name": <function-name>, '
            f'"arguments": <args-json-object>}}\n{CLOSE}')


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates expect them: a call's ``arguments`` as a dict."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except ValueError:
                        raise UsageError(f"tool call {fn.get('name')!r}: its arguments are not JSON") from None
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def plain_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template that does not know tools: the Hermes system block first, earlier calls written
    as ``<tool_call>`` text and tool results as ``<tool_response>`` user turns (Hermes' own layout)."""
    system = hermes_system(tools)
    out: list[dict] = []
    for m in template_messages(messages):
        role, text = m["role"], m.get("content") or ""
        if role == "system":
            system = f"{text}\n\n{system}" if text else system
            continue
        if role == "assistant" and m.get("tool_calls"):
            text = "\n".join(f"{OPEN}\n{json.dumps(c['function'], ensure_ascii=False)}\n{CLOSE}" for c in m["tool_calls"])
        elif role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        out.append({"role": role, "content": text})
    return [{"role": "system", "content": system}, *out]


def render_with_tools(tokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    """Token ids of ``messages`` with ``tools`` offered, ready for the assistant's answer."""
    if knows_tools(tokenizer):
        text = tokenizer.apply_chat_template(template_messages(messages), tools=tools, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    from steermoe_core.generation.chat import render_chat

    return render_chat(tokenizer, plain_messages(messages, tools))


# -- parsing --------------------------------------------------------------------------------------------
def _call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _closed(text: str) -> str:
    """``text`` with a last ``<tool_call>`` that its budget cut before the closing tag closed (the
    JSON inside may be whole: a grammar-constrained call ends with its JSON, the tag is then forced)."""
    last = text.rfind(OPEN)
    if last < 0 or CLOSE in text[last:]:
        return text
    tail = text[last + len(OPEN):].rstrip()
    for k in range(len(CLOSE) - 1, 0, -1):
        if tail.endswith(CLOSE[:k]):
            tail = tail[:-k].rstrip()
            break
    return f"{text[:last]}{OPEN}{tail}{CLOSE}"


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _bare_calls(text: str, known: set[str] | None) -> list[ToolCall]:
    """Calls written without the tags, as some models write them (Qwen2.5-Coder answers a fenced
    ```json {"name": ..., "arguments": ...}```): only when the whole answer is such JSON (an object
    or a list of them), every call to an offered function; anything else is text."""
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    if not body.startswith(("{", "[")):
        return []
    try:
        obj = json.loads(body)
    except ValueError:
        return []
    calls = [_call(json.dumps(o)) for o in (obj if isinstance(obj, list) else [obj])]
    if not calls or any(c is None or (known is not None and c.name not in known) for c in calls):
        return []
    return calls


def parse_tool_calls(text: str, known: set[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(the text outside the calls, the calls) of a model's answer. Any malformed block, or a call
    to a function not offered, makes the answer plain text with no calls."""
    if OPEN not in text:
        bare = _bare_calls(text, known)
        return ("", bare) if bare else (text, [])
    raw, text = text, _closed(text)
    last = text.rfind(OPEN)
    if text is not raw and text[:last].count(OPEN) and _call(text[last + len(OPEN):-len(CLOSE)].strip()) is None:
        text = text[:last].rstrip()  # whole calls, then one its budget cut mid-way: the whole ones stand
    calls = []
    for body in _CALL.findall(text):
        call = _call(body)
        if call is None or (known is not None and call.name not in known):
            return raw, []
        calls.append(call)
    if not calls or text.count(OPEN) != len(calls):
        return raw, []
    return _CALL.sub("", text).strip(), calls


# -- grammar-constrained decoding -------------------------------------------------------------------------
def call_schema(fn: dict) -> dict:
    """The JSON schema of one call to ``fn``: its name and arguments that follow its parameters
    (undeclared arguments are left out unless the schema says ``additionalProperties``)."""
    params = dict(fn.get("parameters") or {"type": "object", "properties": {}})
    # only the declared arguments, as OpenAI's strict mode decodes them: a model free to add keys can
    # spend its whole budget inventing one
    params.setdefault("additionalProperties", False)
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_grammar(fns: list[dict], many: bool = False) -> str:
    """An llguidance grammar admitting ``<tool_call>`` blocks (one, or one or more when ``many``)
    whose JSON is a call to one of ``fns`` with schema-valid arguments."""
    schema = call_schema(fns[0]) if len(fns) == 1 else {"anyOf": [call_schema(f) for f in fns]}
    # compact JSON: a model free to pick whitespace can fill its budget with it
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    lark = (f"start: call{'+' if many else ''}\n"
            f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps(schema)}\n")
    return lark


class Constraint:
    """One row's grammar matcher: which token ids may come next (an llguidance ``LLMatcher``)."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab, self.seen = matcher, vocab, 0

    def allowed(self, row: list[int]):
        """A numpy bool mask over the vocabulary after consuming the row's new ids (all False once it is done)."""
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        for tok in row[self.seen:]:
            self.matcher.consume_token(tok)
        self.seen = len(row)
        bits = allocate_token_bitmask(1, self.vocab)
        fill_next_token_bitmask(self.matcher, bits)
        return (np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.vocab]).astype(bool)


def constraint(tokenizer, grammar: str, stop_ids: list[int]) -> Constraint:
    """A fresh ``Constraint`` for one row (the tokenizer's llguidance view is cached on it)."""
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise MissingDependency("a named tool or tool_choice='required' decodes under the tool's schema with llguidance: "
                                "pip install 'steermoe[serve]'") from None
    ll = getattr(tokenizer, "_steermoe_llg", None)
    if ll is None:
        ll = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(stop_ids))
        tokenizer._steermoe_llg = ll
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    if matcher.is_error():
        raise UsageError(f"cannot build the tool-call grammar: {matcher.get_error()}")
    return Constraint(matcher, ll.vocab_size)


def tool_prompt(tokenizer, turns: list[dict], tools: list[dict], forced: list[dict] | None, many: bool,
                stop_ids: list[int]) -> tuple[list[int], Constraint | None]:
    """The prompt ids of ``turns`` with ``tools`` offered, and the grammar the answer must follow when
    it must be a call (``forced``: the named tool, or every tool with 'required'; ``many``: several
    calls allowed). What `serve`'s chat route and `infer --tools` both decode."""
    ids = render_with_tools(tokenizer, turns, tools)
    return ids, (constraint(tokenizer, call_grammar(forced, many), stop_ids) if forced else None)


def tool_answer(backend, turns: list[dict], tools: list[dict], forced: list[dict] | None = None, many: bool = True,
                max_new_tokens: int = 256) -> tuple[str, list[ToolCall], str | None]:
    """(text outside the calls, the calls, the decode flag) of the frozen LLM's answer to ``turns``
    with ``tools`` offered, on any backend that runs text alone."""
    from steermoe_core.generation.chat import complete_texts

    ids, grammar = tool_prompt(backend.text_tokenizer, turns, tools, forced, many, backend.stop_ids)
    texts, flags = complete_texts(backend, [ids], [max_new_tokens], constraints=[grammar])
    content, calls = parse_tool_calls(texts[0], set(functions(tools)))
    return content, calls if many else calls[:1], flags[0]
