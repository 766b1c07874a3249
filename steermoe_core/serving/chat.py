"""``POST /v1/chat/completions``: OpenAI's chat route, with ``input_audio`` parts.

Messages with audio are an instruction about that audio: the last user turn's text is the
instruction (the earlier turns its context), planned and answered as `infer` would (a transcribe
request is a transcript; steermoe's ``strategy`` field picks how any other is answered). Messages
without audio go to the frozen LLM alone. Answers are ``chat.completion``, or ``chat.completion.chunk``
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
from steermoe_core.inference.plan import TASK_PROMPTS, is_task_prompt
from steermoe_core.serving.jobs import Outcome
from steermoe_core.serving.protocol import ApiError, ChatCompletionRequest, invalid
from steermoe_core.serving.state import authorize, check_length, check_model, ready
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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = authorize(request)
    settings = state.settings
    check_length(request, int(settings.max_upload_mb * 1024 * 1024) * 4 // 3 + 1024 * 1024)  # base64 is 4/3 of the audio
    jobs = ready(state)
    body = await _read_body(request)
    check_model(state, body.model)
    sm = state.sm
    budget = body.budget(settings.max_new_tokens or sm.policy.answer_tokens)
    temperature = body.temperature or 0.0
    turns = text_turns(body.messages)
    audios = audio_parts(body.messages, settings.max_upload_mb)
    if audios:
        clips = [await asyncio.to_thread(decode_upload, data, name) for name, data in audios]
        del audios
        ask, prompt = audio_prompt(turns)
        # asked to transcribe (whatever the context): a transcript, decoded directly, never re-asked of the LLM, its
        # segments under their durations' budgets as the transcription route's (max_tokens, when given, caps each)
        transcribe = is_task_prompt(ask)
        cap = (body.max_completion_tokens or body.max_tokens or settings.max_new_tokens) if transcribe else budget
        plan = sm.plan(clips, "the audio", prompt, body.strategy, transcribe=transcribe, max_new_tokens=cap)
        del clips
        ticket = jobs.start(plan, temperature, body.stream, budget)
    else:
        try:
            ids = await asyncio.to_thread(chat_ids, sm.backend, [t for t in turns if t["content"] or t["role"] != "system"])
        except SteermoeError as e:
            raise ApiError(400, str(e), code="unsupported") from None
        ticket = jobs.start_text(ids, budget, temperature, body.stream)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def last(out: Outcome) -> list[dict]:
            evs = [{**chunk({}, out.finish_reason), **how(out.result)}]
            if include_usage:
                evs.append({**chunk({}), "choices": [], "usage": _usage(out)})
            return evs

        return StreamingResponse(jobs.events(ticket, lambda: [chunk({"role": "assistant", "content": ""})],
                                             lambda t: chunk({"content": t}), last),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    out = await jobs.outcome(request, ticket)
    return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.result.text}, "finish_reason": out.finish_reason}],
            "usage": _usage(out), **how(out.result)}
