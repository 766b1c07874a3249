"""Function calling through `/v1/chat/completions`, tested with the official openai client against a
live server on a tiny random model: a named tool (or 'required') always yields a schema-valid call,
streamed calls assemble to the same call, auto mode never returns a broken call, and spoken
requests are transcribed first."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from conftest import random_sm, tone_clip

from steermoe_core.generation.tools import (
    hermes_system,
    knows_tools,
    parse_tool_calls,
    plain_messages,
    render_with_tools,
    template_messages,
    tool_answer,
)

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytest.importorskip("fastapi")

TIMER = {"type": "function", "function": {
    "name": "set_timer", "description": "Start a countdown timer.",
    "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 600},
                                                    "label": {"type": "string", "enum": ["tea", "pasta", "laundry"]}},
                   "required": ["minutes", "label"], "additionalProperties": False}}}
LIGHTS = {"type": "function", "function": {
    "name": "lights", "description": "Switch the lights.",
    "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}}
TOOLS = [TIMER, LIGHTS]
BUDGET = 160


@pytest.fixture(scope="module")
def sm(backbones):
    return random_sm(backbones, max_segment_seconds=4.0, vad="energy", tokens_per_second=2.0)


@pytest.fixture(scope="module")
def client(sm):
    import uvicorn

    from steermoe_core.serving.app import ServeSettings, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(ServeSettings(), loaded=sm), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                break
        time.sleep(0.1)
    yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    srv.should_exit = True
    t.join(30)


def _valid(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


ASK = [{"role": "user", "content": "Set a timer for ten minutes for the tea."}]


def test_a_named_tool_always_yields_a_schema_valid_call_streamed_or_not(client):
    choice = {"type": "function", "function": {"name": "set_timer"}}
    r = client.chat.completions.create(model="steermoe", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=BUDGET)
    msg = r.choices[0].message
    assert len(msg.tool_calls) == 1 and r.choices[0].finish_reason == "stop"  # a named tool: 'stop', as OpenAI answers
    args = _valid(msg.tool_calls[0], TIMER)
    with client.chat.completions.stream(model="steermoe", messages=ASK, tools=TOOLS, tool_choice=choice,
                                        max_tokens=BUDGET) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert len(streamed) == 1 and _valid(streamed[0], TIMER) == args  # the deltas assemble to the same call
    names = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(names) > 1  # arguments arrive in fragments
    assert not any(e.type == "content.delta" and "<" in e.delta for e in events)  # never a (partial) tag as text


def test_required_calls_one_of_the_tools(client):
    r = client.chat.completions.create(model="steermoe", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=BUDGET)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls", r.choices[0].message.content
    for call in calls:
        _valid(call, {t["function"]["name"]: t for t in TOOLS}[call.function.name])


def test_auto_mode_returns_text_or_whole_calls_never_a_broken_one(client):
    r = client.chat.completions.create(model="steermoe", messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=24)
    msg = r.choices[0].message
    if msg.tool_calls:  # a random model rarely calls: when it does, each call is whole
        assert r.choices[0].finish_reason == "tool_calls"
        for call in msg.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert isinstance(msg.content, str) and r.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(model="steermoe", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None


def test_a_follow_up_turn_with_the_tool_result_is_answered(client):
    choice = {"type": "function", "function": {"name": "set_timer"}}
    first = client.chat.completions.create(model="steermoe", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=BUDGET)
    call = first.choices[0].message.tool_calls[0]
    turns = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True, "ends_at": "12:10"})}]
    r = client.chat.completions.create(model="steermoe", messages=turns, tools=TOOLS, max_tokens=12)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens and r.choices[0].message is not None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="steermoe", messages=ASK, tools=TOOLS, max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "launch_rocket"}})
    assert e.value.body["code"] == "invalid_tool_choice" and "launch_rocket" in e.value.body["message"]


def test_a_spoken_request_is_transcribed_then_called(client, sm):
    rng = np.random.default_rng(0)
    audio = np.concatenate([tone_clip(1, 1.2) * 0.5, rng.normal(0, 1e-3, 8000).astype(np.float32)])
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    heard = sm.transcribe([audio])[0].text
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}]}]
    r = client.chat.completions.create(model="steermoe", messages=messages, tools=TOOLS, max_tokens=BUDGET,
                                       tool_choice={"type": "function", "function": {"name": "lights"}})
    _valid(r.choices[0].message.tool_calls[0], LIGHTS)
    assert r.model_extra["steermoe"]["transcript"] == heard and r.usage.prompt_tokens_details.audio_tokens > 0


def test_rendering_parsing_and_the_python_api(sm):
    tok = sm.backend.text_tokenizer
    assert template_messages([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "lights", "arguments": '{"on": true}'}}]}])[0]["tool_calls"][0]["function"]["arguments"] == {"on": True}
    plain = plain_messages(ASK, TOOLS)
    assert plain[0]["role"] == "system" and "<tools>" in plain[0]["content"] and "set_timer" in hermes_system(TOOLS)
    if not knows_tools(tok):  # the tiny tokenizer's template has no tools: the Hermes block is rendered instead
        assert tok.decode(render_with_tools(tok, ASK, TOOLS)).count("set_timer") == 1
    text = 'Sure. <tool_call>\n{"name": "lights", "arguments": {"on": false}}\n</tool_call>'
    content, calls = parse_tool_calls(text, {"lights"})
    assert content == "Sure." and calls[0].name == "lights" and json.loads(calls[0].arguments) == {"on": False}
    fenced = '```json\n{"name": "set_timer", "arguments": {"minutes": 10}}\n```'  # Qwen2.5-Coder's way
    content, calls = parse_tool_calls(fenced, {"set_timer"})
    assert content == "" and calls[0].name == "set_timer" and json.loads(calls[0].arguments) == {"minutes": 10}
    assert parse_tool_calls('It is {"name": "set_timer", "arguments": {}}', {"set_timer"})[1] == []  # prose around it: text
    for broken in ('<tool_call>{"name": "lights", "arguments": {"on": </tool_call>', '<tool_call>{"name": "fly"}</tool_call>'):
        assert parse_tool_calls(broken, {"lights"}) == (broken, [])  # returned as text, never a broken call
    _, calls, _ = tool_answer(sm.backend, ASK, TOOLS, forced=[TIMER["function"]], many=False, max_new_tokens=BUDGET)
    assert len(calls) == 1 and jsonschema.validate(json.loads(calls[0].arguments), TIMER["function"]["parameters"]) is None


def test_infer_tools_prints_each_call_as_a_json_line(backbones, tiny_data, tmp_path):
    from conftest import train_tiny
    from typer.testing import CliRunner

    from steermoe_cli.main import app

    ckpt = train_tiny(backbones, tiny_data, tmp_path / "run", 4)
    clip = tmp_path / "command.wav"
    sf.write(clip, tone_clip(2, 1.5) * 0.5, 16000, subtype="PCM_16")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    args = ["infer", str(clip), "--model", str(ckpt), "--backend", "torch", "--device", "cpu", "--tools", str(tools),
            "--max-new-tokens", str(BUDGET)]
    r = CliRunner().invoke(app, [*args, "--tool-choice", "set_timer"])
    assert r.exit_code == 0, r.output
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["path"] == str(clip) and line["name"] == "set_timer" and "transcript" in line
    jsonschema.validate(line["arguments"], TIMER["function"]["parameters"])
    r = CliRunner().invoke(app, [*args, "--tool-choice", "launch_rocket"])
    assert r.exit_code == 2 and "launch_rocket" in r.output
    (tmp_path / "bad.json").write_text("{not json")
    r = CliRunner().invoke(app, [*args[:-4], "--tools", str(tmp_path / "bad.json")])
    assert r.exit_code == 2 and "bad.json" in r.output and "Traceback" not in r.output
    # the onnxruntime backend decodes under the same grammar: the same schema-valid call as torch
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from steermoe_core.export.onnx_export import export_onnx
    from steermoe_core.generation.torch_backend import TorchBackend
    from steermoe_core.inference.onnx_backend import OnnxBackend

    export_onnx(ckpt, tmp_path / "export")
    calls = [tool_answer(b, ASK, TOOLS, forced=[TIMER["function"]], many=False, max_new_tokens=BUDGET)[1]
             for b in (TorchBackend.load(ckpt, "cpu"), OnnxBackend.load(tmp_path / "export", "cpu"))]
    assert [c[0].name for c in calls] == ["set_timer", "set_timer"] and calls[0][0].arguments == calls[1][0].arguments
