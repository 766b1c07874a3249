"""``POST /v1/chat/completions``: OpenAI's chat route, with ``input_audio`` parts.

Messages with audio are an instruction about that audio: the last user turn's text is the
instruction (the earlier turns its context), planned and answered as `infer` would (a transcribe
request is a transcript; steermoe's ``strategy`` field picks how any other is answered). Messages
without audio go to the frozen LLM alone. With ``tools`` (``tool_calls``), the frozen LLM answers
the conversation with the tools offered; spoken turns are transcribed first and the transcript is
returned as ``steermoe.transcript``. Answers are ``chat.completion``, or ``chat.completion.chunk``
events ending ``[DONE]`` (usage last with ``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from steermoe_core.errors import SteermoeError
from steermoe_core.generation.chat import chat_ids
from steermoe_core.inference.plan import TASK_PROMPTS, Refusal, is_task_prompt
from steermoe_core.serving.batcher import Row
from steermoe_core.serving.jobs import Jobs, Outcome, Ticket
from steermoe_core.serving.protocol import ApiError, AudioPart, ChatCompletionRequest, invalid
from steermoe_core.serving.state import authorize, check_length, check_model, ready
from steermoe_core.serving.tool_calls import ToolStream, finish_reason, message, tool_row
from steermoe_core.serving.transcriptions import how
from steermoe_core.serving.uploads import audio_parts, decode_upload, text_turns

router = APIRouter()


def audio_prompt(turns: list[dict]) -> tuple[str, str]:
    """(the instruction, the prompt written after the audio): the last user turn's text (the
    transcription prompt when it has none), after the system prompt and earlier turns as context.
    The audio of every turn comes first, in order, as the model was trained: audio, then the prompt."""
    last = next((i for i in range(len(turns) - 1, -1, -1) if turns[i]["role"] == "user"), len(turns) - 1)
    ask = turns[last]["content"].strip() or TASK_PROMPTS["transcribe"]
    before = [t for t in turns[:last] if t["content"].strip()]
    if not before:
        return ask, ask
    context = "\n".join(f"{t['role']}: {t['content'].strip()}" for t in before)
    return ask, f"{context}\nuser: {ask}"


def _usage(out: Outcome) -> dict:
    prompt = out.text_tokens + out.audio_tokens
    return {"prompt_tokens": prompt, "completion_tokens": out.output_tokens, "total_tokens": prompt + out.output_tokens,
            "prompt_tokens_details": {"audio_tokens": out.audio_tokens, "cached_tokens": 0},
            "audio_seconds": round(out.result.audio_s, 3)}


async def _read_body(request: Request) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise invalid(e) from None


def _extension(out: Outcome, tools: bool) -> dict:
    """steermoe's fields beside OpenAI's: how an answer about audio was made; with tools, what was heard."""
    if tools and out.result.transcript is not None:
        return {"steermoe": {"transcript": out.result.transcript}}
    return how(out.result)


async def _start(state, body: ChatCompletionRequest, jobs: Jobs) -> Ticket:
    """Plan the chat and queue it: audio through the planner (with tools: transcribed, then the chat
    over what was heard), text alone to the frozen LLM."""
    settings, sm = state.settings, state.sm
    budget = body.budget(settings.max_new_tokens or sm.policy.answer_tokens)
    temperature = body.temperature or 0.0
    turns = text_turns(body.messages)
    tools = bool(body.offered())
    audios = audio_parts(body.messages, settings.max_upload_mb)
    if not audios:
        if tools:
            return jobs.start_text(await asyncio.to_thread(tool_row, sm.backend, body, turns, budget), temperature, body.stream)
        try:
            ids = await asyncio.to_thread(chat_ids, sm.backend, [t for t in turns if t["content"] or t["role"] != "system"])
        except SteermoeError as e:
            raise ApiError(400, str(e), code="unsupported") from None
        return jobs.start_text(Row(ids=ids, budget=budget), temperature, body.stream)
    clips = [await asyncio.to_thread(decode_upload, data, name) for name, data in audios]
    ask, prompt = audio_prompt(turns)
    if tools:  # a spoken request: what was said, as text in its turn, then the chat with the tools
        plan = sm.plan(clips, "the audio", TASK_PROMPTS["transcribe"], transcribe=True, max_new_tokens=settings.max_new_tokens)
        if not plan.rows:  # nothing was said: nothing to call a tool for
            plan.refusal = Refusal("no_speech", "the audio: no speech found, nothing to answer about")
        heard = [i for i, m in enumerate(body.messages) if isinstance(m.content, list) and any(isinstance(p, AudioPart) for p in m.content)]

        def then(result) -> Row:
            said = [dict(t) for t in turns]
            said[heard[-1]]["content"] = f"{result.text}\n{said[heard[-1]]['content']}".strip()
            return tool_row(sm.backend, body, said, budget)

        return jobs.start(plan, temperature, body.stream, budget, then=then)
    # asked to transcribe (whatever the context): a transcript, decoded directly, never re-asked of the LLM, its
    # segments under their durations' budgets as the transcription route's (max_tokens, when given, caps each)
    transcribe = is_task_prompt(ask)
    cap = (body.max_completion_tokens or body.max_tokens or settings.max_new_tokens) if transcribe else budget
    plan = sm.plan(clips, "the audio", prompt, body.strategy, transcribe=transcribe, max_new_tokens=cap)
    return jobs.start(plan, temperature, body.stream, budget)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = authorize(request)
    settings = state.settings
    check_length(request, int(settings.max_upload_mb * 1024 * 1024) * 4 // 3 + 1024 * 1024)  # base64 is 4/3 of the audio
    jobs = ready(state)
    body = await _read_body(request)
    check_model(state, body.model)
    ticket = await _start(state, body, jobs)
    tools = bool(body.offered())
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        parser = ToolStream(body) if tools else None

        def delta(text: str) -> list[dict]:
            return [chunk(d) for d in parser.feed(text)] if parser else [chunk({"content": text})]

        def last(out: Outcome) -> list[dict]:
            evs = [chunk(d) for d in parser.finish()] if parser else []
            reason = finish_reason(body, parser.calls > 0, out.finish_reason) if parser else out.finish_reason
            evs.append({**chunk({}, reason), **_extension(out, tools)})
            if include_usage:
                evs.append({**chunk({}), "choices": [], "usage": _usage(out)})
            return evs

        return StreamingResponse(jobs.events(ticket, lambda: [chunk({"role": "assistant", "content": ""})], delta, last),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    out = await jobs.outcome(request, ticket)
    msg, calls = message(body, out.result.text) if tools else ({"role": "assistant", "content": out.result.text}, [])
    return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish_reason(body, bool(calls), out.finish_reason)}],
            "usage": _usage(out), **_extension(out, tools)}
